"""SQuAD: the real v1.1 dev file, the article-level split, official normalization/EM/F1, the HF QA preprocessing
with the real MiniLM tokenizer, and post-processing that recovers gold spans."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loradrop.tasks import (
    compute_metrics,
    get_metadata,
    load_task_data,
    normalize_answer,
    postprocess_squad,
    preprocess,
    squad_metrics,
)
from loradrop.tasks.squad import f1_score


@pytest.fixture(scope="module")
def squad(data_root):
    if not (data_root / "squad" / "v1.1" / "dev-v1.1.json").is_file():
        pytest.skip("squad/v1.1/dev-v1.1.json is not in the data folder")
    return load_task_data("squad", data_root)


def test_squad_rows_and_article_split(squad, data_root):
    train, val = squad["train"], squad["validation"]
    assert len(train) + len(val) == 10570
    assert len(set(train["title"]) | set(val["title"])) == 48
    assert set(train["title"]).isdisjoint(val["title"])  # split by article
    assert set(train["context"]).isdisjoint(val["context"])  # so no context leaks
    assert 0.15 < len(val) / 10570 < 0.3
    assert set(train["id"]).isdisjoint(val["id"])
    meta = get_metadata(squad)
    assert meta["dev_split"] is True and "by article" in meta["split_notes"]["validation"]
    again = load_task_data("squad", data_root / "squad" / "v1.1" / "dev-v1.1.json")  # the file itself
    assert list(again["validation"]["id"]) == list(val["id"])  # deterministic
    other = load_task_data("squad", data_root, seed=5)
    assert set(other["validation"]["title"]) != set(val["title"])
    first = train[0]
    assert first["title"] == "Super_Bowl_50" or val[0]["title"] == "Super_Bowl_50"
    answers = [a for a in train["answers"][:50]]
    assert all(len(a["text"]) >= 1 and len(a["text"]) == len(a["answer_start"]) for a in answers)


def test_squad_answers_are_aligned(squad):
    for row in squad["validation"].select(range(200)):
        start, text = row["answers"]["answer_start"][0], row["answers"]["text"][0]
        assert row["context"][start: start + len(text)] == text


def _write_squad(path, qas, version="1.1"):
    payload = {"version": version, "data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.",
                                                                            "qas": qas}]}]}
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def test_squad_v2_file_and_errors(tmp_path):
    qas = [{"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
           {"id": "q2", "question": "Where is Rome?", "answers": [], "is_impossible": True}]
    folder = tmp_path / "v2.0"
    folder.mkdir()
    _write_squad(folder / "dev-v2.0.json", qas, "v2.0")
    _write_squad(folder / "train-v2.0.json", qas * 1, "v2.0")
    data = load_task_data("squad_v2", tmp_path)
    assert data["validation"][1]["answers"] == {"text": [], "answer_start": []}
    assert get_metadata(data)["dev_split"] is False
    with pytest.raises(ValueError, match="q2.*no answer.*squad_v2"):
        load_task_data("squad", folder / "dev-v2.0.json")
    with pytest.raises(ValueError, match=r"no dev-v1.1.json found"):
        load_task_data("squad", tmp_path)
    (tmp_path / "bad.json").write_text('{"version": "1.1"}')
    with pytest.raises(ValueError, match="'data' list"):
        load_task_data("squad", tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------- metrics


def test_official_normalization():
    assert normalize_answer("The  Cat!") == "cat"
    assert normalize_answer("  An apple, a DAY.") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words


def test_exact_match_and_f1_hand_checked():
    # "the cat sat" -> "cat sat"; "a cat sat down" -> "cat sat down": P = 1, R = 2/3, F1 = 0.8
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    preds = {"a": "The  Cat!", "b": "the cat sat", "c": "dog"}
    refs = {"a": ["cat"], "b": ["a cat sat down", "Cat sat."], "c": ["a cat"]}
    out = compute_metrics("squad", preds, refs)
    assert out == {"exact_match": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}  # max over references
    # sequences of answer texts, and a missing prediction scores 0
    assert squad_metrics(["cat", "x"], [["The cat"], ["y"]]) == {"exact_match": 0.5, "f1": 0.5}
    assert squad_metrics({"a": "cat"}, {"a": ["cat"], "b": ["dog"]})["exact_match"] == 0.5


def test_squad_v2_no_answer_metrics():
    preds = {"a": "", "b": "France", "c": "Paris"}
    refs = {"a": [], "b": ["France"], "c": []}
    out = compute_metrics("squad_v2", preds, refs)
    assert out["exact_match"] == pytest.approx(2 / 3) and out["f1"] == pytest.approx(2 / 3)
    assert out["HasAns_exact_match"] == 1.0 and out["NoAns_exact_match"] == 0.5
    assert out["HasAns_total"] == 1 and out["NoAns_total"] == 2
    with pytest.raises(ValueError, match="no answer text"):
        squad_metrics(["x"], [[]])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        squad_metrics(["x", "y"], [["x"]])


def test_metrics_against_dataset_references(squad):
    val = squad["validation"].select(range(40))
    gold = {row["id"]: row["answers"]["text"][0] for row in val}
    assert compute_metrics("squad", gold, val) == {"exact_match": 1.0, "f1": 1.0}


# ----------------------------------------------------------------------------------- pre/post-processing


@pytest.fixture(scope="module")
def small(squad):
    return {"train": squad["train"].select(range(60)), "validation": squad["validation"].select(range(40))}


def _encode(small, tokenizer, max_seq_len=128, doc_stride=32):
    from datasets import DatasetDict

    return preprocess("squad", DatasetDict(small), tokenizer, max_seq_len, doc_stride=doc_stride)


def test_train_features_point_at_the_answer(small, minilm_tokenizer):
    encoded = _encode(small, minilm_tokenizer)
    train = encoded["train"]
    assert len(train) > 60  # long contexts overflow into several windows
    assert set(train.column_names) >= {"input_ids", "attention_mask", "start_positions", "end_positions"}
    assert {len(ids) for ids in train["input_ids"]} == {128}
    found = 0
    for row in train:
        s, e = row["start_positions"], row["end_positions"]
        if s == 0:
            assert e == 0  # answer outside this window -> CLS
            continue
        found += 1
        span = minilm_tokenizer.decode(row["input_ids"][s: e + 1])
        assert s <= e and row["token_type_ids"][s] == 1
        assert normalize_answer(span).replace(" ", "") != ""
    assert found >= 50
    # the first example's answer, decoded from its window, equals the (lowercased) gold text
    first = next(r for r in train if r["start_positions"] > 0)
    gold = small["train"][0]["answers"]["text"][0]
    decoded = minilm_tokenizer.decode(first["input_ids"][first["start_positions"]: first["end_positions"] + 1])
    assert normalize_answer(decoded).replace(" ", "") == normalize_answer(gold).replace(" ", "")


def test_eval_features_and_postprocess_recovers_gold(small, minilm_tokenizer):
    encoded = _encode(small, minilm_tokenizer)
    features, examples = encoded["validation"], small["validation"]
    assert {"example_id", "offset_mapping"} <= set(features.column_names)
    assert set(features["example_id"]) == set(examples["id"])
    first = features[0]
    assert first["offset_mapping"][0] is None  # CLS and question tokens carry no offsets
    assert any(o is not None for o in first["offset_mapping"])
    n, length = len(features), 128
    start = np.full((n, length), -10.0)
    end = np.full((n, length), -10.0)
    gold = {row["id"]: row["answers"] for row in examples}
    for i, (ex_id, offsets) in enumerate(zip(features["example_id"], features["offset_mapping"])):
        begin = gold[ex_id]["answer_start"][0]
        finish = begin + len(gold[ex_id]["text"][0])
        for k, o in enumerate(offsets):
            if o is not None and o[0] <= begin < o[1]:
                start[i, k] = 10.0
            if o is not None and o[0] < finish <= o[1]:
                end[i, k] = 10.0
    predictions = postprocess_squad(examples, features, start, end, n_best=20, max_answer_len=30)
    assert predictions == {ex_id: answers["text"][0] for ex_id, answers in gold.items()}
    assert compute_metrics("squad", predictions, examples) == {"exact_match": 1.0, "f1": 1.0}

    def softmax(x):
        z = np.exp(x - x.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    # averaged member probabilities (two members that agree) give the same spans
    probs_start = (softmax(start) + softmax(start * 0.5)) / 2
    probs_end = (softmax(end) + softmax(end * 0.5)) / 2
    assert postprocess_squad(examples, features, probs_start, probs_end, score_type="probs") == predictions
    # with a tiny max_answer_len, multi-token answers can no longer be produced exactly
    short = postprocess_squad(examples, features, start, end, max_answer_len=1)
    assert short != predictions
    # SQuAD v2: a dominant CLS score means "no answer"
    null_start, null_end = start.copy(), end.copy()
    null_start[:, 0] = null_end[:, 0] = 50.0
    empty = postprocess_squad(examples, features, null_start, null_end, version_2_with_negative=True)
    assert set(empty.values()) == {""}
    with pytest.raises(ValueError, match="score_type"):
        postprocess_squad(examples, features, start, end, score_type="softmax")


def test_preprocess_argument_errors(small, minilm_tokenizer):
    with pytest.raises(ValueError, match="doc_stride"):
        _encode(small, minilm_tokenizer, max_seq_len=64, doc_stride=64)


def test_gold_positions_of_eval_windows_equal_the_training_features(small, minilm_tokenizer):
    """The span calibration's gold start/end per evaluation window is what the training features would hold (CLS when
    the window lacks the answer), and span_calibration scores distributions against it."""
    from datasets import DatasetDict

    from loradrop.tasks.span import gold_positions, span_calibration

    as_train = preprocess("squad", DatasetDict({"train": small["validation"]}), minilm_tokenizer, 128, doc_stride=32)
    features = _encode(small, minilm_tokenizer)["validation"]
    start, end = gold_positions(small["validation"], features)
    assert start.tolist() == as_train["train"]["start_positions"] and end.tolist() == as_train["train"]["end_positions"]
    assert 0 < int((start > 0).sum()) < len(features)  # answers inside some windows, outside others

    sharp = torch.full((len(features), 128), 1e-9)
    sharp[torch.arange(len(features)), start] = 1.0
    sharp_end = torch.full((len(features), 128), 1e-9)
    sharp_end[torch.arange(len(features)), end] = 1.0
    exact = span_calibration(sharp, sharp_end, (start, end))
    assert exact["span_nll"] < 1e-6 and exact["span_ece"] < 1e-6 and exact["span_brier"] < 1e-6
    uniform = span_calibration(torch.full((len(features), 128), 1 / 128), torch.full((len(features), 128), 1 / 128),
                               (start, end))
    at_cls = (float((start == 0).double().mean()) + float((end == 0).double().mean())) / 2  # argmax of a tie: 0
    assert uniform["span_nll"] == pytest.approx(np.log(128)) and uniform["span_ece"] == pytest.approx(at_cls - 1 / 128)
