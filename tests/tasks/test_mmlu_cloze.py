"""MMLU in cloze form (`loradrop.tasks.mmlu_cloze`, issue #14's instruction-tuning study): the prompts, each choice's
probability equal to a softmax over the choices scored alone without padding, LoRA Dropout ensembles, and an
instruct run through the CLI scored and re-scored this way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import cli_train
from loradrop.tasks import get_task
from loradrop.tasks.cloze_scoring import with_choice_scoring
from loradrop.tasks.mmlu import load_mmlu, read_mmlu_csv
from loradrop.tasks.mmlu_cloze import encode_mmlu_cloze, score_mmlu_cloze


def test_cloze_prompts(mmlu_dir):
    five = load_mmlu(mmlu_dir, "test", subjects="abstract_algebra", k_shot=5, cloze=True)
    letters = load_mmlu(mmlu_dir, "test", subjects="abstract_algebra", k_shot=5)
    assert list(five["answer"]) == list(letters["answer"]) and list(five["choices"]) == list(letters["choices"])
    shots = read_mmlu_csv(mmlu_dir / "dev" / "abstract_algebra_dev.csv")[:5]
    prompt = five[0]["prompt"]
    expected = ("The following are questions (with answers) about abstract algebra.\n\n"
                + "".join(f"Question: {q}\nAnswer: {c[a].strip()}\n\n" for q, c, a in shots)
                + f"Question: {five[0]['question']}\nAnswer:")
    assert prompt == expected and "\nA. " not in prompt  # no lettered list
    zero = load_mmlu(mmlu_dir, "test", subjects="abstract_algebra", cloze=True)[0]["prompt"]
    assert zero.endswith(f"about abstract algebra.\n\nQuestion: {five[0]['question']}\nAnswer:")


def _alone(model, tokenizer, prefix: str, continuation: str) -> tuple[float, int]:
    head = tokenizer(prefix)["input_ids"]
    tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    logp = model(ids).logits[0, :-1].log_softmax(-1)
    return float(logp[torch.arange(len(head) - 1, ids.shape[1] - 1), ids[0, len(head):]].sum()), len(tail)


@pytest.mark.parametrize("per_token", [False, True])
def test_probabilities_are_a_softmax_over_choices_scored_alone(llama_dir, mmlu_dir, per_token):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    import loradrop

    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(str(llama_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # members that differ
    loradrop.apply_lora_dropout(model, loradrop.LoraDropoutConfig(p=0.5, seed=0))
    model.eval()
    questions = load_mmlu(mmlu_dir, "test", subjects=["anatomy", "astronomy"], k_shot=1, cloze=True).select(range(3))
    longest = [max(map(len, q)) for q in encode_mmlu_cloze(questions, tokenizer, 2048)["choice_ids"]]
    questions = questions.select(sorted(range(3), key=lambda i: -longest[i]))  # scoring sorts them: order comes back
    timing: dict = {}
    with torch.no_grad():
        single, ens, mi = score_mmlu_cloze(model, tokenizer, questions, per_token=per_token, batch_size=2, ensemble=3,
                                           chunk_size=None, seed=0, max_len=2048, timing=timing)
        for q, row in enumerate(questions):
            scores = [_alone(model, tokenizer, row["prompt"], " " + c.strip()) for c in row["choices"]]
            logits = torch.tensor([s / n if per_token else s for s, n in scores])
            torch.testing.assert_close(single[q], logits.softmax(-1), atol=2e-4, rtol=1e-3)
    assert not model.training  # scoring leaves the LM in eval mode (a scorer once restored its own, training, mode)
    assert timing["questions"] == 3 and timing["rows"] == 12 and timing["padded_tokens"] >= sum(longest)
    assert ens.shape == (3, 4) and torch.allclose(ens.sum(-1), torch.ones(3))
    log = lambda p: p.clamp_min(1e-30).log()  # noqa: E731 - summed scores saturate: compare log-probabilities
    assert not torch.allclose(log(ens), log(single), atol=1e-3) and bool((mi >= 0).all())  # the members differ


def test_instruct_tasks_take_cloze_scoring_for_mmlu():
    spec = get_task("alpaca")
    assert with_choice_scoring(spec, "letter") is spec
    assert with_choice_scoring(spec, "cloze_mean").prepare.keywords == {"mmlu_scoring": "cloze_mean"}


@pytest.mark.slow
def test_instruct_run_scores_mmlu_in_cloze_form(data_root: Path, llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "instruct"
    metrics = cli_train(["train", "--task", "instruct", "--model", str(llama_dir), "--max-train-samples", "8",
                         "--max-eval-samples", "4", "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "64",
                         "--ensemble", "2", "--lr", "2e-2", "--choice-scoring", "cloze_mean", "--output", str(out)])
    assert metrics["data"]["mmlu"]["scoring"] == "cloze_mean" and "estimate" not in metrics["data"]["mmlu"]
    assert metrics["data"]["mmlu"]["timing"]["mmlu_5shot"]["rows"] == 16  # 4 questions x 4 choices
    for which in ("single", "ensemble"):
        assert {"accuracy", "ece", "nll"} <= metrics["eval"][which]["mmlu_0shot"].keys()
    assert json.loads((out / "run_config.json").read_text())["args"]["choice_scoring"] == "cloze_mean"
    from loradrop.cli import main

    again = tmp_path / "again"
    assert main(["eval", "--adapter", str(out), "--ensemble", "2", "--output", str(again)]) == 0
    assert json.loads((again / "eval_metrics.json").read_text())["eval"] == metrics["eval"]
