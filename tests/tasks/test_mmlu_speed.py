"""MMLU scoring speed-ups (issue #16): length-sorted batches within the ensemble seed groups give the same
probabilities as the scoring before (`benchmarks/mmlu_speed.py`'s verbatim `legacy_score_choices`), the progress
bar counts questions, the default subset and its metadata."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loradrop
from helpers import make_tiny_llama
from loradrop.tasks.mmlu import (
    MMLU_DEFAULT_QUESTIONS_PER_SUBJECT,
    choice_token_ids,
    default_subset,
    load_mmlu,
    load_mmlu_eval,
)
from loradrop.tasks.mmlu_scoring import estimate_line, length_batches, plan_tokens, score_choices

ROOT = Path(__file__).resolve().parents[2]


def legacy_score_choices():
    spec = importlib.util.spec_from_file_location("mmlu_speed", ROOT / "benchmarks" / "mmlu_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.legacy_score_choices


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("gguf", reason="reading the SmolLM2 tokenizer from its GGUF needs the gguf package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loradrop.pretrained import ModelLoadError

    try:
        folder = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    except ModelLoadError as err:
        pytest.skip(f"needs the SmolLM2 tokenizer: {err}")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # members that differ
    loradrop.apply_lora_dropout(model, loradrop.LoraDropoutConfig(p=0.5, seed=0))
    return model, AutoTokenizer.from_pretrained(folder)


def test_length_batches_sort_within_groups_and_cap_padding():
    lengths = [5, 1, 9, 3, 2, 8, 7]
    batches = length_batches(lengths, group_size=3, max_tokens=10)
    assert batches == [(0, [1, 0]), (0, [2]), (1, [4, 3]), (1, [5]), (2, [6])]
    assert sorted(i for _, rows in batches for i in rows) == list(range(7))
    assert all(len(rows) * max(lengths[i] for i in rows) <= 10 for _, rows in batches)
    assert length_batches([50, 60], group_size=8, max_tokens=10) == [(0, [0]), (0, [1])]  # too long: alone


@pytest.mark.parametrize("ensemble", [0, 3])
def test_score_choices_equals_the_scoring_before(llama, ensemble, capsys):
    model, tokenizer = llama
    words = ["alpha", "beta gamma", "delta epsilon zeta eta", "theta", "iota kappa lambda mu nu xi omicron pi",
             "rho sigma", "tau upsilon phi chi psi omega", "one"]
    prompts = [f"Question {i}: {w * (1 + i % 3)}\nA. x\nB. y\nC. z\nD. w\nAnswer:" for i, w in enumerate(words)]
    ids = choice_token_ids(tokenizer)
    common = dict(batch_size=3, ensemble=ensemble, chunk_size=None, seed=5, max_len=2048)
    old = legacy_score_choices()(model, tokenizer, prompts, ids, desc="old", **common)
    timing = {}
    new = score_choices(model, tokenizer, prompts, ids, desc="new", max_tokens=40, timing=timing, **common)
    assert timing["forward_batches"] > 3 and timing["questions"] == len(prompts)  # the groups were split
    assert timing["padded_tokens"] < sum(max(len(s) for s in tokenizer(prompts[i:i + 3])["input_ids"])
                                         * len(prompts[i:i + 3]) for i in range(0, len(prompts), 3))
    torch.testing.assert_close(new[0], old[0], atol=1e-5, rtol=1e-4)  # single pass
    if ensemble:  # ensemble probabilities and mutual information: the same members per question
        torch.testing.assert_close(new[1], old[1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(new[2], old[2], atol=1e-5, rtol=1e-4)
        assert float(old[2].max()) > 1e-4  # the members do disagree
    else:
        assert new[1] is None and new[2] is None
    err = capsys.readouterr().err
    assert f"/{len(prompts)}" in err and "question" in err  # the bar counts questions
    assert "estimated" in err and "s/question" in err


def test_default_subset_per_subject(mmlu_dir, capsys):
    full = load_mmlu(mmlu_dir, "test", subjects=["anatomy", "astronomy"])
    sub = default_subset(full, 2, seed=3)
    assert sorted(sub["subject"]) == ["anatomy", "anatomy", "astronomy", "astronomy"]
    assert list(sub["question"]) == list(default_subset(full, 2, seed=3)["question"])
    assert list(sub["question"]) != list(default_subset(full, 2, seed=4)["question"])

    metadata = {}
    sets = load_mmlu_eval(str(mmlu_dir), None, 0, metadata)
    expected = 57 * MMLU_DEFAULT_QUESTIONS_PER_SUBJECT
    assert len(sets[0]) == len(sets[5]) == expected and list(sets[0]["question"]) == list(sets[5]["question"])
    info = metadata["mmlu"]
    assert info["questions"] == expected and info["questions_before_subsampling"] == 14042
    assert info["subset"].startswith("default: 2 seeded questions per subject") and info["subjects"] == 57
    assert "default subset, 114 of 14042" in capsys.readouterr().err
    load_mmlu_eval(str(mmlu_dir), 5, 0, metadata)
    assert metadata["mmlu"]["questions"] == 5 and "--max-eval-samples 5" in metadata["mmlu"]["subset"]


@pytest.mark.parametrize(("ensemble", "chunk_size"), [(0, None), (3, None), (3, 2)])
def test_shared_prefix_kv_cache_equals_the_scoring_before(llama, ensemble, chunk_size):
    model, tokenizer = llama
    shots = {s: "".join(f"Example {s} {j}: what is {j} plus {j}?\nA. 1\nB. 2\nC. {2 * j}\nD. 4\nAnswer: C\n\n"
                        for j in range(3)) for s in ("math", "law")}
    rows = [("math", "Is 7 prime?"), ("law", "Who decides?"), ("math", "What is the square root of sixteen, roughly?"),
            ("math", "Two?"), ("law", "A long question about contracts, torts and the many remedies at law?"),
            ("law", "Why?"), ("math", "Is zero even or odd, and why would anyone ask?")]
    prompts = [f"Questions about {s}.\n\n{shots[s]}{q}\nA. a\nB. b\nC. c\nD. d\nAnswer:" for s, q in rows]
    ids = choice_token_ids(tokenizer)
    common = dict(batch_size=4, ensemble=ensemble, chunk_size=chunk_size, seed=2, max_len=2048)
    old = legacy_score_choices()(model, tokenizer, prompts, ids, desc="old", **common)
    timing = {}
    new = score_choices(model, tokenizer, prompts, ids, desc="new", timing=timing, prefix_keys=[s for s, _ in rows],
                        **common)
    lengths = [len(x) for x in tokenizer(prompts)["input_ids"]]
    assert timing["padded_tokens"] < sum(lengths)  # the shared prefixes ran once per batch
    torch.testing.assert_close(new[0], old[0], atol=1e-5, rtol=1e-4)
    if ensemble:
        torch.testing.assert_close(new[1], old[1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(new[2], old[2], atol=1e-5, rtol=1e-4)
        assert float(old[2].max()) > 1e-4


@pytest.mark.parametrize("ensemble", [0, 2])
def test_estimate_before_scoring_counts_the_planned_work(llama, ensemble):
    """The line printed before MMLU scoring: its token count is exactly what `score_choices` then runs per pass, and
    the estimate is the probe's rate x passes x those tokens."""
    model, tokenizer = llama
    shots = "".join(f"Example {j}: what is {j} plus {j}?\nA. 1\nB. 2\nC. {2 * j}\nD. 4\nAnswer: C\n\n"
                    for j in range(3))
    rows = [("math", "Is 7 prime?"), ("math", "Two?"), ("law", "Who decides?"), ("law", "Why is it so?")]
    sets = {0: [f"About {s}.\n\n{q}\nA. a\nB. b\nC. c\nD. d\nAnswer:" for s, q in rows],
            5: [f"About {s}.\n\n{shots}{q}\nA. a\nB. b\nC. c\nD. d\nAnswer:" for s, q in rows]}
    token_sets = {k: tokenizer(v)["input_ids"] for k, v in sets.items()}
    keys = {k: [s for s, _ in rows] for k in sets}
    line, record = estimate_line(model, token_sets, keys, batch_size=4, ensemble=ensemble, max_len=2048)
    passes = 1 + ensemble
    assert f"4 questions x 2 shot settings x {passes} passes" in line and f"= {4 * 2 * passes} question passes" in line
    for k, prompts in sets.items():
        timing = {}
        score_choices(model, tokenizer, prompts, choice_token_ids(tokenizer), batch_size=4, ensemble=ensemble,
                      chunk_size=None, seed=0, max_len=2048, desc="x", timing=timing, prefix_keys=keys[k])
        assert record["tokens_per_pass"][f"mmlu_{k}shot"] == timing["padded_tokens"]
        assert record["estimated_seconds"][f"mmlu_{k}shot"] == pytest.approx(
            record["seconds_per_token_probe"] * passes * timing["padded_tokens"], rel=1e-3, abs=0.05)
    assert record["tokens_per_pass"]["mmlu_5shot"] < sum(map(len, token_sets[5]))  # prefixes counted once
    assert f"{passes * sum(record['tokens_per_pass'].values()):,} tokens to run" in line
    assert 0 < record["seconds_per_token_probe"] < 1
    assert plan_tokens(token_sets[5], batch_size=4, max_len=2048) == sum(  # no keys: plain padded batches
        len(b) * max(len(token_sets[5][i]) for i in b)
        for _, b in length_batches([len(t) for t in token_sets[5]], 4, 4096))
