"""Cloze scoring of the commonsense tasks (`loradrop.tasks.cloze_scoring`): the prompts, scores equal to each choice
scored alone without padding, the loss as the cross-entropy over choice scores (with the Trainer's count and N
member copies), ensembles and MC dropout through the CLI, OOD sets scored the same way, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import cli_train
from loradrop.errors import DataError, UsageError
from loradrop.tasks import get_task, load_task_data
from loradrop.tasks.cloze_scoring import (
    ClozeCollator,
    ClozeScorer,
    cloze_loss,
    cloze_parts,
    preprocess_cloze,
    with_choice_scoring,
)


@pytest.fixture(scope="module")
def cs_root(data_root: Path) -> Path:
    if not (data_root / "commonsense").is_dir():
        pytest.skip(f"no commonsense data in {data_root / 'commonsense'}")
    return data_root


def test_prompts_per_style():
    assert cloze_parts("question", "Why?", ["A cat", "dogs "]) == [("Question: Why?\nAnswer:", " A cat"),
                                                                    ("Question: Why?\nAnswer:", " dogs")]
    wg = cloze_parts("winogrande", "Tom gave _ the ball because he was kind.", ["Bob", "Tom"])
    rest = " the ball because he was kind."
    assert wg == [("Tom gave Bob", rest), ("Tom gave Tom", rest)]
    assert cloze_parts("winogrande", "The winner was _", ["Ann", "Bo"]) == [("The winner was", " Ann"),
                                                                             ("The winner was", " Bo")]
    assert cloze_parts("boolq", "is it", ["no", "yes"], "P.")[1] == ("Passage: P.\nQuestion: is it?\nAnswer:", " yes")
    assert cloze_parts("piqa", "open a jar", ["twist", "push"])[0] == ("Goal: open a jar\nSolution:", " twist")
    with pytest.raises(DataError, match="exactly one blank"):
        cloze_parts("winogrande", "no blank here", ["a", "b"])
    with pytest.raises(DataError, match="unknown prompt style"):
        cloze_parts("essay", "q", ["a", "b"])


def _alone(model, tokenizer, prefix: str, continuation: str) -> float:
    """Reference: the continuation's log-likelihood after the prefix, one unpadded sequence."""
    head = tokenizer(prefix)["input_ids"]
    tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    logp = model(ids).logits[0, :-1].log_softmax(-1)
    return float(logp[torch.arange(len(head) - 1, ids.shape[1] - 1), ids[0, len(head):]].sum())


@pytest.mark.parametrize("task", ["arc_easy", "winogrande_s"])
def test_scores_match_each_choice_scored_alone(llama_dir, cs_root, task):
    from datasets import DatasetDict
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    model = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    spec = get_task(task)
    raw = load_task_data(spec, cs_root)["train"]
    rows = ([i for i, c in enumerate(raw["choices"]) if len(c) in (3, 5)][:2] if task == "arc_easy" else []) + [0, 1]
    subset = raw.select(rows)
    encoded = preprocess_cloze(spec, DatasetDict({"x": subset}), tokenizer, 256)["x"]
    batch = ClozeCollator(tokenizer.pad_token_id, spec.num_labels)([encoded[i] for i in range(len(encoded))])
    assert len({len(ids) for q in encoded["choice_ids"] for ids in q}) > 1  # really padded
    with torch.no_grad():
        scores = ClozeScorer(model, spec.num_labels)(**{k: v for k, v in batch.items() if k != "labels"}).logits
        style = "question" if task == "arc_easy" else "winogrande"
        for q, row in enumerate(subset):
            parts = cloze_parts(style, row["question"], row["choices"], row["context"])
            expected = [_alone(model, tokenizer, p, c) for p, c in parts]
            torch.testing.assert_close(scores[q, :len(parts)], torch.tensor(expected), atol=2e-4, rtol=1e-4)
            assert torch.isinf(scores[q, len(parts):]).all()  # choices the question does not have
    assert batch["labels"].tolist() == list(subset["label"])


def test_loss_is_the_cross_entropy_over_choice_scores():
    torch.manual_seed(0)
    features = [{"choice_ids": [[1, 2, 3], [1, 4]], "cont_lens": [2, 1], "labels": 1, "n_choices": 2},
                {"choice_ids": [[5, 6], [5, 7, 8], [9]], "cont_lens": [1, 2, 1], "labels": 0, "n_choices": 3}]
    batch = ClozeCollator(0, 3, train=True)(features)
    assert batch["labels"].ne(-100).sum() == 2 and batch["logits_to_keep"] == 3
    inputs = batch["loss_inputs"]
    assert inputs["row_slots"].tolist() == [0, 1, 3, 4, 5]
    assert inputs["cont_targets"].tolist() == [[2, 3], [-100, 4], [-100, 6], [7, 8], [-100, 9]]  # right-aligned
    logits = torch.randn(5, 3, 10)  # the last 3 positions of each row
    logp = logits.log_softmax(-1)
    row_scores = [logp[0, 0, 2] + logp[0, 1, 3], logp[1, 1, 4], logp[2, 1, 6], logp[3, 0, 7] + logp[3, 1, 8],
                  logp[4, 1, 9]]
    q1 = torch.stack(row_scores[:2]).log_softmax(-1)[1]
    q2 = torch.stack(row_scores[2:]).log_softmax(-1)[0]
    expected = -float(q1 + q2) / 2
    loss = cloze_loss({"logits": logits}, batch["labels"], num_choices=3, **inputs)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
    doubled = cloze_loss({"logits": logits.repeat(2, 1, 1)}, batch["labels"], 4, num_choices=3, **inputs)
    assert math.isclose(float(doubled), expected / 2, rel_tol=1e-5)  # N = 2 members, 4 questions in the step
    means = [row_scores[0] / 2, row_scores[1], row_scores[2], row_scores[3] / 2, row_scores[4]]  # per token
    q1, q2 = torch.stack(means[:2]).log_softmax(-1)[1], torch.stack(means[2:]).log_softmax(-1)[0]
    per_token = cloze_loss({"logits": logits}, batch["labels"], num_choices=3, per_token=True, **inputs)
    assert math.isclose(float(per_token), -float(q1 + q2) / 2, rel_tol=1e-5)


def test_only_multiple_choice_tasks_take_cloze_scoring():
    spec = get_task("winogrande_s")
    assert with_choice_scoring(spec, "letter") is spec and with_choice_scoring(spec, None) is spec
    assert with_choice_scoring(spec, "cloze").evaluate.__name__ == "evaluate_cloze"
    assert with_choice_scoring(spec, "cloze_mean").prepare.keywords == {"per_token": True}
    with pytest.raises(UsageError, match="choice_scoring must be one of"):
        with_choice_scoring(spec, "mean")
    with pytest.raises(UsageError, match="not to task 'rte'"):
        with_choice_scoring(get_task("rte"), "cloze")



@pytest.mark.slow
def test_cloze_runs_train_evaluate_and_score_ood_sets(llama_dir, cs_root, tmp_path):
    from loradrop.cli import main

    common = ["train", "--task", "openbookqa", "--model", str(llama_dir), "--data-dir", str(cs_root),
              "--max-train-samples", "16", "--max-eval-samples", "8", "--holdout-fraction", "0.25", "--max-steps",
              "2", "--batch-size", "4", "--ensemble", "3", "--lr", "0.01", "--choice-scoring", "cloze"]
    ld = cli_train([*common, "--output", str(tmp_path / "ld"), "--p", "0.5", "--samples", "2", "--ood-task",
                 "arc_easy,mmlu_college_physics"])
    assert ld["data"]["choice_scoring"]["training_loss"] == "cross-entropy over the question's choice scores"
    assert ld["config"]["args"]["choice_scoring"] == "cloze" and math.isfinite(ld["train"]["train_loss"])
    assert ld["eval"]["ensemble"]["n"] == 8 and ld["eval"]["ensemble"]["ensemble_size"] == 3
    sets = ld["uncertainty"]["ood_sets"]
    assert [s["task"] for s in sets] == ["arc_easy", "mmlu_college_physics"]
    assert all(s["metrics"]["single"]["n"] == 8 and s["metrics"]["ensemble"]["n"] == 8 for s in sets)
    rows = [json.loads(line) for line in (tmp_path / "ld" / sets[0]["predictions"]).read_text().splitlines()]
    assert len(rows[0]["single_probs"]) == 5  # ARC's five slots, as scored by the OBQA model in cloze form
    mc = cli_train([*common, "--output", str(tmp_path / "mc"), "--no-lora-dropout", "--peft-dropout", "0.3",
                    "--test-ensemble", "mc_dropout", "--choice-scoring", "cloze_mean"])
    assert mc["eval"]["ensemble"]["nll"] != mc["eval"]["single"]["nll"]
    assert mc["data"]["choice_scoring"]["scoring"].startswith("cloze: the mean")
    # eval re-scores the run as it was trained (cloze), and the same numbers come back
    assert main(["eval", "--adapter", str(tmp_path / "ld"), "--ensemble", "3", "--output", str(tmp_path / "e")]) == 0
    again = json.loads((tmp_path / "e" / "eval_metrics.json").read_text())
    assert again["eval"]["single"]["accuracy"] == ld["eval"]["single"]["accuracy"]
    assert math.isclose(again["eval"]["single"]["nll"], ld["eval"]["single"]["nll"], rel_tol=1e-5)
