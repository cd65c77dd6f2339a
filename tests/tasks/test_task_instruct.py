"""Instruction SFT data (Alpaca demo, LIMA) and MMLU: real files, prompt formats, label masking, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loradrop.tasks import (
    IGNORE_INDEX,
    compute_metrics,
    format_alpaca_prompt,
    get_metadata,
    load_mmlu,
    load_task_data,
    mmlu_metrics,
    mmlu_subjects,
    preprocess,
)

MMLU_HEADER = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
FIRST_DEV = "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:"


@pytest.fixture(scope="module")
def instruct_dir(data_root):
    path = data_root / "instruction" / "llamafactory"
    if not (path / "alpaca_en_demo.json").is_file():
        pytest.skip(f"no Alpaca demo file in {path}")
    return path


# -------------------------------------------------------------------------------------------------- Alpaca


def test_alpaca_rows_and_split(instruct_dir):
    data = load_task_data("alpaca", instruct_dir / "alpaca_en_demo.json")
    assert {k: len(v) for k, v in data.items()} == {"train": 899, "validation": 100}
    assert sum(1 for x in [*data["train"]["input"], *data["validation"]["input"]] if x) == 412
    meta = get_metadata(data)
    assert "validation held out of alpaca_en_demo.json" in meta["summary"]
    assert list(load_task_data("alpaca")["validation"]["instruction"]) == list(data["validation"]["instruction"])


def test_lima_history(instruct_dir):
    data = load_task_data("lima", instruct_dir)
    assert len(data["train"]) + len(data["validation"]) == 1029
    multi = [h for h in [*data["train"]["history"], *data["validation"]["history"]] if h]
    assert len(multi) == 29 and all(len(turn) == 2 for h in multi for turn in h)


def test_alpaca_prompt_format():
    assert format_alpaca_prompt("Add.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert format_alpaca_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    multi = format_alpaca_prompt("And now?", history=[["First?", "Yes."]])
    assert "### Instruction:\nFirst?\n\n### Response:\nYes.\n\n### Instruction:\nAnd now?" in multi


def test_sft_labels_mask_the_prompt(instruct_dir, minilm_tokenizer):
    data = load_task_data("alpaca", instruct_dir, max_train_samples=8, max_eval_samples=4)
    encoded = preprocess("alpaca", data, minilm_tokenizer, max_seq_len=512)
    assert set(encoded["train"].column_names) == {"input_ids", "attention_mask", "labels"}
    for raw, row in zip(data["train"], encoded["train"]):
        prompt = format_alpaca_prompt(raw["instruction"], raw["input"])
        n_prompt = len(minilm_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        labels = row["labels"]
        assert len(labels) == len(row["input_ids"]) == len(row["attention_mask"])
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert all(t != IGNORE_INDEX for t in labels[n_prompt:])
        assert labels[n_prompt:] == row["input_ids"][n_prompt:]
        if len(labels) < 512:  # not truncated: the response ends with the EOS (here BERT's [SEP])
            assert labels[-1] == minilm_tokenizer.sep_token_id
            response = minilm_tokenizer.decode(labels[n_prompt:-1])
            assert response == minilm_tokenizer.decode(minilm_tokenizer(raw["output"], add_special_tokens=False)[
                "input_ids"])
    short = preprocess("alpaca", data, minilm_tokenizer, max_seq_len=32)  # prompts alone exceed 32 tokens
    assert len(short["train"]) == 0
    kept = preprocess("alpaca", data, minilm_tokenizer, max_seq_len=32, drop_fully_masked=False)
    assert {len(x) for x in kept["train"]["input_ids"]} == {32}


def test_alpaca_file_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "z"}]))
    with pytest.raises(ValueError, match=r"record 1 lacks \['output'\]"):
        load_task_data("alpaca", tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"instruction": "x"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_task_data("alpaca", tmp_path / "b.json")
    (tmp_path / "c.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_task_data("alpaca", tmp_path / "c.json")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no Alpaca-format file"):
        load_task_data("alpaca", tmp_path / "empty_dir")
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert len(load_task_data("alpaca", tmp_path / "d.jsonl", validation_fraction=0.5)["validation"]) == 1


def test_causal_lm_metrics_match_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11))
    labels = rng.integers(0, 11, size=(2, 6))
    labels[:, :3] = IGNORE_INDEX
    out = compute_metrics("alpaca", logits, labels)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 11),
                                                 torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=IGNORE_INDEX)
    assert out["loss"] == pytest.approx(float(expected))
    assert out["perplexity"] == pytest.approx(np.exp(float(expected)))
    assert 0.0 <= out["token_accuracy"] <= 1.0


def test_sft_loss_uses_the_eval_batch_size(tiny_llama, monkeypatch):
    """sft_loss batches by the evaluation batch size it is given (evaluate_instruct passes its own batch_size), and
    its value is the token-level NLL of the responses whatever that size is."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    import loradrop.tasks.instruct as instruct
    from loradrop.errors import UsageError

    model = tiny_llama()
    rng = np.random.default_rng(0)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for n in (5, 9, 3, 12, 7):
        ids = rng.integers(3, 96, size=n).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * n)
        rows["labels"].append([IGNORE_INDEX] * (n // 2) + ids[n // 2:])
    dataset = Dataset.from_dict(rows)

    class Tokenizer:  # what DataCollatorForSeq2Seq reads
        pad_token_id, padding_side = 0, "right"

        def pad(self, features, **kwargs):
            width = max(len(f["input_ids"]) for f in features)
            return {k: torch.tensor([f[k] + [0] * (width - len(f[k])) for f in features])
                    for k in ("input_ids", "attention_mask")}

    collator = DataCollatorForSeq2Seq(Tokenizer(), padding=True, label_pad_token_id=IGNORE_INDEX)
    sizes = []
    real_loader = torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader",
                        lambda data, batch_size, **kw: sizes.append(batch_size) or real_loader(data, batch_size, **kw))
    losses = [instruct.sft_loss(model, dataset, collator, batch_size=b) for b in (1, 2, 5)]
    assert sizes == [1, 2, 5]
    model.eval()
    with torch.no_grad():
        nll = sum(torch.nn.functional.cross_entropy(
            model(input_ids=torch.tensor([ids])).logits[0, :-1], torch.tensor(labels[1:]), ignore_index=IGNORE_INDEX,
            reduction="sum") for ids, labels in zip(rows["input_ids"], rows["labels"]))
    tokens = sum(sum(t != IGNORE_INDEX for t in labels[1:]) for labels in rows["labels"])
    for loss in losses:
        assert loss == pytest.approx(float(nll) / tokens, rel=1e-5)
    with pytest.raises(UsageError, match="evaluation batch size must be an integer >= 1, got 0"):
        instruct.sft_loss(model, dataset, collator, batch_size=0)

    seen = {}
    monkeypatch.setattr(instruct, "evaluate_mmlu", lambda *a, **kw: instruct.EvalResult(single={}, ensemble=None,
                                                                                        rows=[]))
    monkeypatch.setattr(instruct, "sft_loss", lambda *a, batch_size: seen.setdefault("batch_size", batch_size) or 1.0)
    data = instruct.TaskData(spec=instruct.TASK_SPECS["alpaca"], raw=None, train=None, eval_loss=dataset,
                             eval_split="mmlu:test", collator=collator, metadata={}, extras={"mmlu": {}})
    instruct.evaluate_instruct(model, data, None, batch_size=7, ensemble=0, chunk_size=None, seed=0)
    assert seen == {"batch_size": 7}


# ---------------------------------------------------------------------------------------------------- MMLU


def test_mmlu_row_counts(mmlu_dir):
    assert len(mmlu_subjects(mmlu_dir)) == 57
    assert len(load_mmlu(mmlu_dir, "dev")) == 285
    assert len(load_mmlu(mmlu_dir, "validation")) == 1531
    test = load_mmlu(mmlu_dir, "test")
    assert len(test) == 14042
    counts = dict(zip(*np.unique(test["answer_letter"], return_counts=True)))
    assert counts == {"A": 3222, "B": 3462, "C": 3582, "D": 3776}


def test_mmlu_prompts(mmlu_dir):
    dev = load_mmlu(mmlu_dir, "dev", subjects=["abstract_algebra"])
    assert dev[0]["prompt"] == MMLU_HEADER + FIRST_DEV
    assert dev[0]["answer"] == 1 and dev[0]["answer_letter"] == "B" and dev[0]["choices"] == ["0", "1", "2", "3"]
    five = load_mmlu(mmlu_dir, "test", subjects="abstract_algebra", k_shot=5)
    assert len(five) == 100
    prompt = five[0]["prompt"]
    assert prompt.startswith(MMLU_HEADER + FIRST_DEV + " B\n\n")
    assert prompt.count("Answer:") == 6 and prompt.endswith(f"\nD. {five[0]['choices'][3]}\nAnswer:")
    assert prompt.count("The following are multiple choice questions") == 1
    assert load_mmlu(mmlu_dir, "val", subjects=["high_school_physics"])[0]["prompt"].startswith(
        "The following are multiple choice questions (with answers) about high school physics.\n\n")


def test_mmlu_errors(mmlu_dir):
    with pytest.raises(ValueError, match=r"unknown MMLU subject\(s\) \['astrology'\]; allowed: \['abstract_algebra'"):
        load_mmlu(mmlu_dir, subjects=["astrology"])
    with pytest.raises(ValueError, match="k_shot must be an integer in 0..5"):
        load_mmlu(mmlu_dir, k_shot=6)
    with pytest.raises(ValueError, match="split must be one of"):
        load_mmlu(mmlu_dir, split="train")
    with pytest.raises(ValueError, match="split='dev' needs k_shot=0"):
        load_mmlu(mmlu_dir, split="dev", k_shot=5)


def test_mmlu_bad_answer_letter(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "toy_test.csv").write_text("What?,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"toy_test.csv:1: answer 'E' is not one of \['A', 'B', 'C', 'D'\]"):
        load_mmlu(tmp_path)


def test_mmlu_metrics_macro_and_micro(mmlu_dir):
    data = load_mmlu(mmlu_dir, "val", subjects=["anatomy", "astronomy"])
    n_anatomy = sum(1 for s in data["subject"] if s == "anatomy")
    preds = [a if s == "anatomy" else (a + 1) % 4 for a, s in zip(data["answer"], data["subject"])]
    out = compute_metrics("mmlu", preds, data)
    assert out["accuracy_anatomy"] == 1.0 and out["accuracy_astronomy"] == 0.0
    assert out["accuracy_macro"] == 0.5
    assert out["accuracy"] == pytest.approx(n_anatomy / len(data))
    letters = ["A", "B", "B", "D"]
    hand = mmlu_metrics(letters, ["A", "B", "C", "D"], subjects=["x", "x", "y", "y"])
    assert hand == {"accuracy": 0.75, "accuracy_macro": 0.75, "accuracy_x": 1.0, "accuracy_y": 0.5}
    scores = np.eye(4)[[0, 1, 1, 3]]
    assert mmlu_metrics(scores, [0, 1, 2, 3], subjects=["x", "x", "x", "y"])["accuracy_macro"] == pytest.approx(
        (2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="'E' is not one of"):
        mmlu_metrics(["E"], ["A"])


def test_mmlu_task_and_preprocess(mmlu_dir, minilm_tokenizer):
    data = load_task_data("mmlu", mmlu_dir, max_eval_samples=20)
    assert len(data["train"]) == 285 and len(data["validation"]) == 20 and len(data["test"]) == 20
    assert data["validation"][0]["prompt"].count("Answer:") == 6
    encoded = preprocess("mmlu", data, minilm_tokenizer, max_seq_len=256)
    assert set(encoded["test"].column_names) == {"input_ids", "attention_mask", "answer", "subject"}
    assert max(len(x) for x in encoded["test"]["input_ids"]) <= 256
