"""GLUE: real files from shared/data (row counts from its README), synthetic files for the layouts it lacks,
official metrics against sklearn/scipy, and tokenization with the real MiniLM tokenizer."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from loradrop.errors import DataError
from loradrop.tasks import compute_metrics, get_metadata, load_task_data, preprocess


def label_counts(dataset) -> dict[str, int]:
    names = dataset.features["label"].names
    return {names[k]: v for k, v in sorted(collections.Counter(dataset["label"]).items())}


# ------------------------------------------------------------------------------------------- real data


def test_rte_rows_and_labels(glue_dir):
    data = load_task_data("rte", glue_dir)
    assert {k: len(v) for k, v in data.items()} == {"train": 2490, "validation": 277}
    assert label_counts(data["train"]) == {"entailment": 1249, "not_entailment": 1241}
    assert label_counts(data["validation"]) == {"entailment": 146, "not_entailment": 131}
    first = data["validation"][0]
    assert first["sentence1"].startswith("Dana Reeve, the widow of the actor Christopher Reeve")
    assert first["sentence2"] == "Christopher Reeve had an accident."
    assert first["label"] == 1  # not_entailment
    meta = get_metadata(data)
    assert meta["task"] == "rte" and meta["dev_split"] is False and meta["rows"] == {"train": 2490, "validation": 277}


def test_data_root_and_task_folder_are_accepted(data_root, glue_dir):
    assert len(load_task_data("rte", data_root)["validation"]) == 277  # <root>/glue/RTE
    assert len(load_task_data("rte", glue_dir / "RTE")["validation"]) == 277  # the task folder itself
    assert len(load_task_data("rte")["validation"]) == 277  # default data root


def test_mrpc_bom_and_quotes(glue_dir):
    data = load_task_data("mrpc", glue_dir)
    assert {k: len(v) for k, v in data.items()} == {"train": 3668, "validation": 408}
    assert label_counts(data["train"]) == {"not_equivalent": 1194, "equivalent": 2474}
    assert label_counts(data["validation"]) == {"not_equivalent": 129, "equivalent": 279}
    # an unbalanced quote must not swallow the following rows (QUOTE_NONE)
    assert data["validation"][0]["sentence2"].startswith('"The foodservice pie business does not fit')


def test_stsb_regression_labels(glue_dir):
    data = load_task_data("stsb", glue_dir)
    assert {k: len(v) for k, v in data.items()} == {"train": 5749, "validation": 1500}
    assert data["validation"].features["label"].dtype == "float32"
    scores = np.asarray(data["validation"]["label"])
    assert scores.min() >= 0.0 and scores.max() <= 5.0
    assert data["validation"][0]["label"] == pytest.approx(5.0)
    assert data["train"][1]["label"] == pytest.approx(3.8)


def test_sst2_and_subsampling(glue_dir):
    data = load_task_data("sst2", glue_dir)
    assert {k: len(v) for k, v in data.items()} == {"train": 67349, "validation": 872}
    assert label_counts(data["validation"]) == {"negative": 428, "positive": 444}
    assert label_counts(data["train"]) == {"negative": 29780, "positive": 37569}
    small = load_task_data("sst2", glue_dir, max_train_samples=100, max_eval_samples=50, seed=1)
    assert {k: len(v) for k, v in small.items()} == {"train": 100, "validation": 50}
    idx = small["train"]["idx"]
    assert list(idx) == sorted(idx)  # original order kept
    again = load_task_data("sst2", glue_dir, max_train_samples=100, max_eval_samples=50, seed=1)
    assert list(again["train"]["idx"]) == list(idx)
    assert list(load_task_data("sst2", glue_dir, max_train_samples=100, seed=2)["train"]["idx"]) != list(idx)
    meta = get_metadata(small)
    assert meta["rows_before_subsampling"] == {"train": 67349, "validation": 872}
    assert meta["rows"] == {"train": 100, "validation": 50}


def test_cola_tokenized_layout(glue_dir):
    data = load_task_data("cola", glue_dir)
    assert {k: len(v) for k, v in data.items()} == {"train": 8551, "validation": 1043}
    assert label_counts(data["train"]) == {"unacceptable": 2528, "acceptable": 6023}
    assert label_counts(data["validation"]) == {"unacceptable": 324, "acceptable": 719}
    assert data["validation"][0]["sentence"] == "the sailors rode the breeze clear of the rocks"
    assert data["validation"][527]["sentence"] == "somebody just left guess who"  # test_ood follows test_idd
    meta = get_metadata(data)
    assert meta["layout"] == "CoLA-tokenized" and "not the original" in meta["note"]


def test_qnli_dev_is_split_deterministically(glue_dir):
    data = load_task_data("qnli", glue_dir, seed=0)
    train, val = data["train"], data["validation"]
    assert len(train) + len(val) == 5463
    assert len(val) == pytest.approx(0.2 * 5463, abs=2)
    assert set(train["idx"]).isdisjoint(val["idx"])
    total = collections.Counter(train["label"]) + collections.Counter(val["label"])
    assert total == {0: 2702, 1: 2761}
    val_share = collections.Counter(val["label"])[0] / len(val)
    assert val_share == pytest.approx(2702 / 5463, abs=0.01)  # stratified
    meta = get_metadata(data)
    assert meta["dev_split"] is True and "split from dev.tsv" in meta["summary"]
    assert "seed 0" in meta["split_notes"]["validation"]
    assert list(load_task_data("qnli", glue_dir, seed=0)["validation"]["idx"]) == list(val["idx"])
    assert list(load_task_data("qnli", glue_dir, seed=1)["validation"]["idx"]) != list(val["idx"])
    assert len(load_task_data("qnli", glue_dir, validation_fraction=0.5)["validation"]) == pytest.approx(2731, abs=2)


# --------------------------------------------------------------------------------------- other layouts


def test_original_cola_layout(tmp_path, write_tsv):
    rows = [["gj04", "1", "", "Our friends won't buy this analysis."], ["gj04", "0", "*", "Bill more the book."]]
    write_tsv(tmp_path / "CoLA" / "train.tsv", rows * 3)
    write_tsv(tmp_path / "CoLA" / "dev.tsv", rows)
    data = load_task_data("cola", tmp_path)
    assert {k: len(v) for k, v in data.items()} == {"train": 6, "validation": 2}
    assert data["validation"][1] == {"sentence": "Bill more the book.", "label": 0, "idx": 1}
    assert get_metadata(data)["layout"] == "CoLA"


def _mnli_rows(labels: list[str]) -> list[list[str]]:
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    return [header] + [[str(i), "1", "1e", "fiction", "(", "(", "(", "(", f"premise {i}", f"hypothesis {i}", lab, lab]
                       for i, lab in enumerate(labels)]


def test_mnli_layout_with_mismatched(tmp_path, write_tsv):
    write_tsv(tmp_path / "MNLI" / "train.tsv", _mnli_rows(["entailment", "neutral", "contradiction"] * 2))
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", _mnli_rows(["neutral", "contradiction"]))
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", _mnli_rows(["entailment"]))
    data = load_task_data("mnli", tmp_path)
    assert {k: len(v) for k, v in data.items()} == {"train": 6, "validation": 2, "validation_mismatched": 1}
    assert data["validation"][0] == {"premise": "premise 0", "hypothesis": "hypothesis 0", "label": 1, "idx": 0}
    assert data["validation"][1]["label"] == 2


def test_qqp_layout(tmp_path, write_tsv):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [header, ["0", "1", "2", "How do I cook rice?", "What is the way to cook rice?", "1"],
            ["1", "3", "4", "Why is the sky blue?", "Who won the 2010 world cup?", "0"]]
    write_tsv(tmp_path / "glue" / "QQP" / "train.tsv", rows)
    write_tsv(tmp_path / "glue" / "QQP" / "dev.tsv", rows)
    data = load_task_data("qqp", tmp_path)
    assert data["train"].column_names == ["question1", "question2", "label", "idx"]
    assert list(data["validation"]["label"]) == [1, 0]


# ---------------------------------------------------------------------------------------------- errors


def test_missing_files_error(tmp_path):
    (tmp_path / "RTE").mkdir()
    with pytest.raises(ValueError, match=r"not a GLUE data folder.*RTE/\{train.tsv,dev.tsv\}"):
        load_task_data("rte", tmp_path)


def test_missing_column_error(tmp_path, write_tsv):
    write_tsv(tmp_path / "RTE" / "dev.tsv", [["index", "sentence1", "label"], ["0", "a", "entailment"]])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence2'\].*available columns"):
        load_task_data("rte", tmp_path)


def test_bad_label_error(tmp_path, write_tsv):
    rows = [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"], ["1", "a", "b", "maybe"]]
    write_tsv(tmp_path / "RTE" / "dev.tsv", rows)
    with pytest.raises(ValueError, match=r"dev.tsv:3: label 'maybe' is not one of \['entailment', 'not_entailment'\]"):
        load_task_data("rte", tmp_path)


def test_stsb_score_out_of_range(tmp_path, write_tsv):
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"]
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [header, ["0", "g", "f", "y", "0", "n", "n", "a", "b", "7.5"]])
    with pytest.raises(ValueError, match=r"score 7.5 is outside the allowed range \[0.0, 5.0\]"):
        load_task_data("stsb", tmp_path)


def test_ragged_row_error(tmp_path, write_tsv):
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["fine", "1"], ["a\tb", "0"]])
    with pytest.raises(ValueError, match=r"dev.tsv:3: expected 2 tab-separated fields"):
        load_task_data("sst2", tmp_path)


def test_non_utf8_file_names_the_file_line_and_byte(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "dev.tsv").write_bytes(b"sentence\tlabel\nfine\t1\nbad \xff byte\t0\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: not valid UTF-8 \(byte 0xff at offset 26\); save the file as"):
        load_task_data("sst2", tmp_path)


def test_holdout_carves_validation_from_train_and_scores_dev(glue_dir):
    data = load_task_data("mrpc", glue_dir, holdout_fraction=0.1, seed=3)
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (3302, 366, 408)
    meta = get_metadata(data)
    assert meta["holdout_fraction"] == 0.1 and meta["split_notes"]["test"] == "dev.tsv"
    labels = np.asarray(data["validation"]["label"])
    assert abs(labels.mean() - np.asarray(data["train"]["label"]).mean()) < 0.02  # stratified by label
    assert not set(data["validation"]["idx"]) & set(data["train"]["idx"])
    with pytest.raises(DataError, match="already has a test split"):
        load_task_data("tweets", holdout_fraction=0.1)


def test_empty_split_error(tmp_path, write_tsv):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"]])
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["fine", "1"]])
    with pytest.raises(ValueError, match=r"sst2: split 'train' loaded from .* is empty"):
        load_task_data("sst2", tmp_path)


# --------------------------------------------------------------------------------------------- metrics


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_cola_mcc_matches_sklearn(rng):
    refs, preds = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    preds[:150] = refs[:150]
    out = compute_metrics("cola", preds, refs)
    assert out == {"matthews_correlation": pytest.approx(matthews_corrcoef(refs, preds))}
    assert out["matthews_correlation"] > 0.3


def test_mrpc_accuracy_f1_match_sklearn(rng):
    refs = rng.integers(0, 2, 200)
    logits = rng.normal(size=(200, 2))
    preds = logits.argmax(-1)
    out = compute_metrics("mrpc", logits, refs)
    assert out["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert out["f1"] == pytest.approx(f1_score(refs, preds))
    assert compute_metrics("qqp", preds, refs) == out


def test_stsb_correlations_match_scipy(rng):
    refs = rng.uniform(0, 5, 100)
    preds = refs + rng.normal(scale=1.0, size=100)
    out = compute_metrics("stsb", preds[:, None], refs)
    assert out["pearson"] == pytest.approx(pearsonr(preds, refs)[0])
    assert out["spearman"] == pytest.approx(spearmanr(preds, refs)[0])


def test_accuracy_tasks(rng):
    refs = rng.integers(0, 3, 90)
    assert compute_metrics("mnli", refs, refs) == {"accuracy": 1.0}
    assert compute_metrics("rte", [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 0.75}


def test_metric_input_errors():
    with pytest.raises(ValueError, match=r"label id\(s\) \[2\]; allowed: 0..1"):
        compute_metrics("rte", [0, 2], [0, 1])
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        compute_metrics("sst2", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="expected"):
        compute_metrics("mnli", np.zeros((4, 2)), [0, 1, 2, 0])
    with pytest.raises(ValueError, match="non-integer"):
        compute_metrics("sst2", [0.4, 0.6], [0, 1])


# ------------------------------------------------------------------------------------------ tokenization


def test_rte_preprocess_shapes(glue_dir, minilm_tokenizer):
    data = load_task_data("rte", glue_dir, max_train_samples=64)
    encoded = preprocess("rte", data, minilm_tokenizer, max_seq_len=128)
    val = encoded["validation"]
    assert len(val) == 277 and len(encoded["train"]) == 64
    assert set(val.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert val.features["labels"].dtype == "int64"
    assert list(val["labels"]) == list(data["validation"]["label"])
    lengths = [len(ids) for ids in val["input_ids"]]
    assert max(lengths) <= 128 and max(lengths) == 128  # some RTE pairs are truncated
    row = val[0]
    assert row["input_ids"][0] == minilm_tokenizer.cls_token_id
    assert row["input_ids"].count(minilm_tokenizer.sep_token_id) == 2
    assert set(row["token_type_ids"]) == {0, 1}
    text = minilm_tokenizer.decode(row["input_ids"], skip_special_tokens=True)
    assert text.startswith("dana reeve") and text.endswith("christopher reeve had an accident.")
    padded = preprocess("rte", data, minilm_tokenizer, max_seq_len=64, padding="max_length")
    assert {len(ids) for ids in padded["validation"]["input_ids"]} == {64}
    with pytest.raises(ValueError, match="max_seq_len"):
        preprocess("rte", data, minilm_tokenizer, max_seq_len=0)


def test_stsb_and_cola_preprocess(glue_dir, minilm_tokenizer):
    data = load_task_data("stsb", glue_dir, max_train_samples=20, max_eval_samples=20)
    encoded = preprocess("stsb", data, minilm_tokenizer, max_seq_len=64)
    assert encoded["train"].features["labels"].dtype == "float32"
    assert np.allclose(encoded["validation"]["labels"], data["validation"]["label"])
    cola = preprocess("cola", load_task_data("cola", glue_dir, max_train_samples=10, max_eval_samples=10),
                      minilm_tokenizer, max_seq_len=32)
    assert cola["train"].features["labels"].dtype == "int64"
    assert all(row.count(minilm_tokenizer.sep_token_id) == 1 for row in cola["train"]["input_ids"])
