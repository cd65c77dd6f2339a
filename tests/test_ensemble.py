"""Batched test-time ensembles: equal to one-by-one members, chunk-invariant, seeded, with uncertainty."""

import os

import pytest
import torch
from peft import get_peft_model

import loradrop
from helpers import lora_config, tiny_bert_config
from loradrop import LoraDropoutConfig, ensemble_generate, ensemble_predict, ensemble_score_choices
from loradrop.ensemble import batch_seed, entropy, eval_mode
from loradrop.members import split_members

INPUTS = {"input_ids": torch.randint(0, 120, (4, 10), generator=torch.Generator().manual_seed(1)),
          "attention_mask": torch.ones(4, 10, dtype=torch.long)}


@pytest.fixture
def bert(tiny_bert):
    model = tiny_bert()
    return loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))


def test_classification_ensemble_is_mean_of_member_probabilities(bert):
    out = ensemble_predict(bert, INPUTS, 6, seed=3)
    assert out.kind == "classification" and out.probs.shape == (4, 3) and out.member_probs.shape == (6, 4, 3)
    torch.testing.assert_close(out.probs, out.member_probs.mean(0))
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(4))
    assert torch.all(out.mutual_information >= 0)
    torch.testing.assert_close(out.entropy - out.expected_entropy, out.mutual_information)
    assert out.mutual_information.max() > 0  # the members really differ
    assert torch.equal(out.predictions, out.probs.argmax(-1))


def test_batched_pass_equals_members_one_by_one_and_any_chunking(bert):
    ctl = loradrop.get_controller(bert)
    full = ensemble_predict(bert, INPUTS, 5, seed=7)
    for chunk in (1, 2, 3, 5, 8):
        chunked = ensemble_predict(bert, INPUTS, 5, seed=7, chunk_size=chunk)
        torch.testing.assert_close(chunked.member_probs, full.member_probs, atol=1e-6, rtol=1e-5)
    # one member at a time, by hand, with the same masks
    bert.eval()
    key = ctl.ensemble_key(7)
    with torch.no_grad():
        for m in range(5):
            with ctl.ensemble(key, 1, m):
                probs = bert(**INPUTS).logits.softmax(-1)
            torch.testing.assert_close(probs, full.member_probs[m], atol=1e-6, rtol=1e-5)


def test_seeds(bert):
    a, b = ensemble_predict(bert, INPUTS, 4, seed=1), ensemble_predict(bert, INPUTS, 4, seed=1)
    assert torch.equal(a.member_probs, b.member_probs)
    assert not torch.equal(a.member_probs, ensemble_predict(bert, INPUTS, 4, seed=2).member_probs)
    fresh1, fresh2 = ensemble_predict(bert, INPUTS, 4), ensemble_predict(bert, INPUTS, 4)
    assert not torch.equal(fresh1.member_probs, fresh2.member_probs)


def test_training_mode_is_restored_and_does_not_matter(bert):
    bert.train()
    step = loradrop.get_mask_state(bert)["step"]
    out_train = ensemble_predict(bert, {**INPUTS, "labels": torch.zeros(4, dtype=torch.long)}, 3, seed=5)
    assert bert.training
    assert loradrop.get_mask_state(bert)["step"] == step  # no training masks were consumed
    bert.eval()
    out_eval = ensemble_predict(bert, INPUTS, 3, seed=5)
    assert not bert.training
    torch.testing.assert_close(out_train.probs, out_eval.probs)


def test_regression_ensemble():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = get_peft_model(BertForSequenceClassification(tiny_bert_config(num_labels=1)),
                           lora_config(target_modules=["query", "value"]))
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    out = ensemble_predict(model, INPUTS, 8, seed=0)
    assert out.kind == "regression" and out.member_values.shape == (8, 4)
    torch.testing.assert_close(out.mean, out.member_values.mean(0))
    torch.testing.assert_close(out.std, out.member_values.std(0, unbiased=False))
    assert torch.all(out.std > 0)


def test_span_ensemble_reads_a_legal_span_from_averaged_distributions():
    from transformers import BertForQuestionAnswering

    torch.manual_seed(0)
    model = get_peft_model(BertForQuestionAnswering(tiny_bert_config(num_labels=2)),
                           lora_config(target_modules=["query"]))
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    allowed = torch.zeros(4, 10, dtype=torch.bool)
    allowed[:, 4:] = True  # the "context" part
    out = ensemble_predict(model, INPUTS, 4, seed=0, max_answer_length=3, span_mask=allowed)
    assert out.kind == "span" and out.start_probs.shape == (4, 10) and out.member_start_probs.shape == (4, 4, 10)
    torch.testing.assert_close(out.start_probs, out.member_start_probs.mean(0))
    assert torch.all(out.span_start >= 4) and torch.all(out.span_end >= out.span_start)
    assert torch.all(out.span_end < out.span_start + 3)
    # the chosen span is the best legal product of averaged probabilities
    for b in range(4):
        best = max(
            (out.start_probs[b, i] * out.end_probs[b, j]).item()
            for i in range(4, 10) for j in range(i, min(i + 3, 10))
        )
        assert out.span_score[b].item() == pytest.approx(best, rel=1e-4)


def test_bad_input(bert, tiny_bert):
    with pytest.raises(ValueError, match="n \\(ensemble size\\) must be an integer >= 1, got 0"):
        ensemble_predict(bert, INPUTS, 0)
    with pytest.raises(ValueError, match="chunk_size must be None or an integer >= 1, got 0"):
        ensemble_predict(bert, INPUTS, 2, chunk_size=0)
    with pytest.raises(ValueError, match="call loradrop.apply_lora_dropout"):
        ensemble_predict(tiny_bert(), INPUTS, 2)
    with pytest.raises(ValueError, match="batch has none of the model's inputs"):
        ensemble_predict(bert, {"labels": torch.zeros(2)}, 2)
    with pytest.raises(TypeError, match="batch must be a mapping"):
        ensemble_predict(bert, INPUTS["input_ids"], 2)
    bert.train()
    with pytest.raises(Exception):  # noqa: B017 - the model raises on a malformed batch
        ensemble_predict(bert, {"input_ids": torch.zeros(2, 3, 4, dtype=torch.long)}, 2)
    assert bert.training  # restored after the failure


# ------------------------------------------------------------------------------------------------ causal LMs
def left_padded(pad=0):
    ids = torch.tensor([[pad, pad, 5, 17, 33, 8], [4, 9, 21, 60, 7, 11]])
    mask = (ids != pad).long()
    return ids, mask


def test_generate_with_p0_equals_transformers_greedy(tiny_llama):
    model = tiny_llama()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.0, seed=0))
    ids, mask = left_padded()
    out = ensemble_generate(model, ids, 3, 8, attention_mask=mask, eos_token_id=None)
    model.eval()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0, min_new_tokens=8)
    assert torch.equal(out.sequences, ref)
    torch.testing.assert_close(out.mutual_information, torch.zeros_like(out.mutual_information), atol=1e-6, rtol=0)


def test_generate_shared_kv_cache_equals_full_recomputation(tiny_llama):
    model = tiny_llama()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    ctl = loradrop.get_controller(model)
    ids, mask = left_padded()
    n = 4
    out = ensemble_generate(model, ids, n, 6, attention_mask=mask, seed=11, eos_token_id=[])
    assert out.new_tokens.shape == (2, 6) and torch.all(out.mutual_information >= 0)
    seq, m = ids.clone(), mask.clone()
    model.eval()
    with torch.no_grad(), ctl.ensemble(ctl.ensemble_key(11), n, 0):
        for step in range(6):
            pos = (m.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1].float()
            probs = split_members(logits.softmax(-1), n).mean(0)
            nxt = probs.argmax(-1)
            assert torch.equal(nxt, out.new_tokens[:, step])
            torch.testing.assert_close(probs.gather(1, nxt[:, None]).squeeze(1), out.token_probs[:, step])
            seq = torch.cat([seq, nxt[:, None]], 1)
            m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1)


def test_generate_sampling_and_eos(tiny_llama):
    model = tiny_llama()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    ids, mask = left_padded()
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = ensemble_generate(model, ids, 2, 5, attention_mask=mask, do_sample=True, top_p=0.9, seed=1, generator=g1)
    b = ensemble_generate(model, ids, 2, 5, attention_mask=mask, do_sample=True, top_p=0.9, seed=1, generator=g2)
    assert torch.equal(a.sequences, b.sequences)
    first = ensemble_generate(model, ids, 2, 1, attention_mask=mask, seed=1).new_tokens[:, 0]
    stop = ensemble_generate(model, ids, 2, 5, attention_mask=mask, seed=1, eos_token_id=int(first[0]),
                             pad_token_id=0)
    assert stop.new_tokens[0, 0] == first[0]
    if stop.new_tokens.shape[1] > 1:
        assert torch.all(stop.new_tokens[0, 1:] == 0)  # finished rows are padded
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        ensemble_generate(model, ids, 2, 0)


def test_score_choices_matches_full_forward_for_both_paddings(tiny_llama):
    model = tiny_llama()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    ctl = loradrop.get_controller(model)
    choices = [10, 11, 12, 13]
    ids, mask = left_padded()
    out = ensemble_score_choices(model, ids, choices, 5, attention_mask=mask, seed=2)
    assert out.probs.shape == (2, 4) and out.member_probs.shape == (5, 2, 4)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(2))
    model.eval()
    with torch.no_grad(), ctl.ensemble(ctl.ensemble_key(2), 5, 0):
        logits = split_members(model(input_ids=ids, attention_mask=mask).logits[:, -1][..., choices], 5)
    torch.testing.assert_close(out.member_probs, logits.softmax(-1))
    # the same prompts right-padded give the same scores (the last real token is found per row)
    right_ids = torch.tensor([[5, 17, 33, 8, 0, 0], [4, 9, 21, 60, 7, 11]])
    right = ensemble_score_choices(model, right_ids, choices, 5, attention_mask=(right_ids != 0).long(), seed=2,
                                   chunk_size=2)
    torch.testing.assert_close(right.probs, out.probs, atol=1e-5, rtol=1e-4)


def test_masked_weight_copies_are_reused_under_no_grad_and_follow_weight_updates(bert):
    """Inside an ensemble block (no_grad) all layers' masked A/B copies are built once and reused by later calls
    (every decode step); an in-place weight update (version counter) rebuilds them; with gradients on they are
    rebuilt every call (they must be part of the autograd graph)."""
    ctl = loradrop.get_controller(bert)
    key = ctl.ensemble_key(5)
    layer = bert.base_model.model.bert.encoder.layer[0].attention.self.query
    bert.eval()
    with torch.no_grad(), ctl.ensemble(key, 3, 0):
        first = bert(**INPUTS).logits
        copies = ctl._plan.weights
        assert copies is not None and sum(w is not None for w in copies) == 4  # 2 layers x (query, value)
        again = bert(**INPUTS).logits
        assert ctl._plan.weights is copies
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        layer.lora_B["default"].weight.mul_(3.0)
        changed = bert(**INPUTS).logits
        assert ctl._plan.weights is not copies
    assert not ctl.precompute.holds_copies  # dropped with the block
    with torch.no_grad(), ctl.ensemble(key, 3, 0):  # a fresh block: recomputed from the new weights
        fresh = bert(**INPUTS).logits
    torch.testing.assert_close(changed, fresh, rtol=0, atol=0)
    assert not torch.allclose(changed, first)
    with ctl.ensemble(key, 3, 0):  # gradients on: new copies every call, in the graph
        bert(**INPUTS).logits.sum().backward()
        copies = ctl._plan.weights
        bert(**INPUTS)
        assert ctl._plan.weights is not copies
    assert layer.lora_A["default"].weight.grad is not None


def test_generate_runs_one_forward_per_new_token_and_keeps_only_last_prefill_logits(tiny_llama):
    """T new tokens cost the prefill plus T-1 decode calls, and the prefill returns logits for one position only."""
    model = tiny_llama()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    ids, mask = left_padded()
    seen = []
    handle = model.get_base_model().register_forward_hook(lambda mod, args, out: seen.append(out.logits.shape))
    try:
        out = ensemble_generate(model, ids, 3, 5, attention_mask=mask, eos_token_id=[])
    finally:
        handle.remove()
    assert out.new_tokens.shape == (2, 5)
    assert len(seen) == 5
    assert all(shape[:2] == (6, 1) for shape in seen)  # 3 members x 2 prompts, one position each


# ------------------------------------------------------------------------------------------------ small public helpers
def test_entropy():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]], dtype=torch.float64)
    expected = torch.tensor([0.0, torch.log(torch.tensor(2.0)), 1.5 * torch.log(torch.tensor(2.0))],
                            dtype=torch.float64)
    torch.testing.assert_close(entropy(probs), expected)  # 0 log 0 = 0, and the input's dtype
    torch.testing.assert_close(entropy(probs.T, dim=0), expected)


def test_batch_seed_gives_distinct_reproducible_seeds_per_batch():
    seeds = {batch_seed(seed, i) for seed in range(3) for i in range(100)}
    assert len(seeds) == 300 and min(seeds) >= 0
    assert batch_seed(2, 5) == batch_seed(2, 5)


def test_eval_mode_restores_the_previous_mode_also_on_error(bert):
    bert.train()
    with eval_mode(bert) as model:
        assert model is bert and not bert.training
    assert bert.training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(bert):
        raise RuntimeError("boom")
    assert bert.training
    bert.eval()
    with eval_mode(bert):
        pass
    assert not bert.training


# ---------------------------------------------------------------------------------------- uncertainty-aware generation
def test_generate_returns_token_mask_sequence_scores_and_abstain_flags(tiny_llama):
    model = tiny_llama()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    ids, mask = left_padded()
    out = ensemble_generate(model, ids, 4, 6, attention_mask=mask, seed=3, eos_token_id=[])
    assert out.token_mask.shape == (2, 6) and out.token_mask.all()  # no eos: every token counts
    torch.testing.assert_close(out.sequence_mutual_information, out.mutual_information.mean(1))
    torch.testing.assert_close(out.sequence_max_entropy, out.entropy.max(1).values)
    torch.testing.assert_close(out.sequence_score, out.sequence_mutual_information)
    assert out.flagged is None
    # the per-token values are those of the members' next-token distributions (recomputed by hand)
    ctl = loradrop.get_controller(model)
    model.eval()
    with torch.no_grad(), ctl.ensemble(ctl.ensemble_key(3), 4, 0):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        members = split_members(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
                                .softmax(-1), 4)
    torch.testing.assert_close(out.entropy[:, 0], entropy(members.mean(0)))
    torch.testing.assert_close(out.mutual_information[:, 0],
                               (entropy(members.mean(0)) - entropy(members).mean(0)).clamp_min(0))
    # a threshold between the two rows' scores flags exactly the more uncertain one; generation is unchanged
    lo, hi = sorted(out.sequence_max_entropy.tolist())
    flagged = ensemble_generate(model, ids, 4, 6, attention_mask=mask, seed=3, eos_token_id=[],
                                abstain_threshold=(lo + hi) / 2, abstain_score="max_entropy")
    assert torch.equal(flagged.sequences, out.sequences)
    assert flagged.flagged.tolist() == (out.sequence_max_entropy > (lo + hi) / 2).tolist()
    assert flagged.flagged.sum() == 1
    with pytest.raises(ValueError, match="abstain_score must be one of"):
        ensemble_generate(model, ids, 2, 2, abstain_score="variance")
    with pytest.raises(ValueError, match="abstain_threshold must be None or a finite number"):
        ensemble_generate(model, ids, 2, 2, abstain_threshold=float("nan"))


def test_generate_sequence_scores_stop_at_eos(tiny_llama):
    model = tiny_llama()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=0))
    ids, mask = left_padded()
    free = ensemble_generate(model, ids, 3, 5, attention_mask=mask, seed=1, eos_token_id=[])
    eos = int(free.new_tokens[0, 1])  # row 0 stops at its second token
    out = ensemble_generate(model, ids, 3, 5, attention_mask=mask, seed=1, eos_token_id=eos, pad_token_id=0)
    first = int((free.new_tokens[0] == eos).nonzero()[0])  # the eos may come earlier than position 1
    assert out.token_mask[0, : first + 1].all() and not out.token_mask[0, first + 1:].any()
    kept = out.token_mask[0]
    torch.testing.assert_close(out.sequence_mutual_information[0], out.mutual_information[0, kept].mean())
    torch.testing.assert_close(out.sequence_max_entropy[0], out.entropy[0, kept].max())


# Factual questions with their accepted answers (lower case substrings) for the SmolLM2 measurement below.
FACTS = [("What is the capital of France?", ["paris"]), ("What is the capital of Japan?", ["tokyo"]),
         ("What is the capital of Australia?", ["canberra"]), ("What is the capital of Canada?", ["ottawa"]),
         ("What is the capital of Italy?", ["rome"]), ("What is the capital of Germany?", ["berlin"]),
         ("What is the capital of Spain?", ["madrid"]), ("What is the capital of Brazil?", ["brasília", "brasilia"]),
         ("What is the capital of Egypt?", ["cairo"]), ("What is the capital of Kenya?", ["nairobi"]),
         ("What is the capital of Mongolia?", ["ulaanbaatar", "ulan bator"]),
         ("What is the capital of Peru?", ["lima"]),
         ("What is the capital of Switzerland?", ["bern"]), ("What is the capital of Turkey?", ["ankara"]),
         ("What is the capital of New Zealand?", ["wellington"]), ("What is the capital of Nigeria?", ["abuja"]),
         ("What is the capital of Kazakhstan?", ["astana"]), ("What is the capital of Vietnam?", ["hanoi"]),
         ("What is the capital of Morocco?", ["rabat"]), ("What is the capital of Bolivia?", ["sucre", "la paz"]),
         ("Who wrote Romeo and Juliet?", ["shakespeare"]), ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
         ("What is the chemical symbol for gold?", ["au"]), ("How many legs does a spider have?", ["8", "eight"]),
         ("What planet is known as the Red Planet?", ["mars"]), ("What is the largest ocean on Earth?", ["pacific"]),
         ("Who developed the theory of relativity?", ["einstein"]),
         ("What is the boiling point of water in Celsius?", ["100"]), ("In which year did World War II end?", ["1945"]),
         ("What is the square root of 144?", ["12", "twelve"]),
         ("Who was the first person to walk on the Moon?", ["armstrong"]),
         ("What is the capital of Myanmar?", ["naypyidaw", "nay pyi taw", "naypyitaw"])]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LORADROP_MEASURE_SMOLLM2"),
                    reason="a measurement (about 3.5 minutes on 2 CPU cores): set LORADROP_MEASURE_SMOLLM2=1")
def test_smollm2_measure_uncertainty_of_wrong_and_right_answers():
    """A measurement on the real SmolLM2-135M-Instruct, reported (run with -s) and checked: do wrong answers get
    higher sequence uncertainty than right ones (mean and AUROC, for mean token MI and max token entropy)? The
    adapter is PiSSA-initialised (its A and B hold the top-8 singular directions of q_proj/v_proj, the base keeps the
    residual), so the unmasked model IS the pretrained one and LoRA Dropout's masks (p=0.1, 8 members) perturb its
    principal directions. Numbers: docs/UNCERTAINTY.md."""
    from peft import LoraConfig

    from loradrop.pretrained import load_model, load_tokenizer, smollm2_gguf
    from loradrop.uncertainty import ood_detection, sequence_scores

    try:
        smollm2_gguf()
        pytest.importorskip("gguf", reason="de-quantising the GGUF needs the gguf package")
        tokenizer, base = load_tokenizer("smollm2"), load_model("smollm2", "causal_lm")
    except loradrop.errors.ModelLoadError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            init_lora_weights="pissa_niter_4", task_type="CAUSAL_LM"))
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.1, seed=0))
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q, _ in FACTS]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = ensemble_generate(model, enc["input_ids"], 8, 24, attention_mask=enc["attention_mask"], seed=0,
                            abstain_threshold=0.25)
    assert out.token_mask.shape == out.entropy.shape and torch.isfinite(out.sequence_score).all()
    assert torch.equal(out.flagged, out.sequence_mutual_information > 0.25)

    def graded(tokens, mask):
        texts = [tokenizer.decode(t[m], skip_special_tokens=True) for t, m in zip(tokens, mask)]
        ok = [any(a in text.lower() for a in answers) for text, (_, answers) in zip(texts, FACTS)]
        return texts, torch.tensor(ok)

    texts, right = graded(out.new_tokens, out.token_mask)
    report = {"ensemble_accuracy": right.double().mean().item(), "right": int(right.sum()),
              "wrong": int((~right).sum())}
    if right.any() and (~right).any():
        for name in ("mutual_information", "max_entropy"):
            score = getattr(out, f"sequence_{name}")
            report[f"ensemble_{name}"] = {"right": score[right].mean().item(), "wrong": score[~right].mean().item(),
                                          "auroc_wrong_vs_right": ood_detection(score[right], score[~right])["auroc"]}
        report["flagged_wrong"] = int(out.flagged[~right].sum())
        report["flagged_right"] = int(out.flagged[right].sum())
    # the single pass for comparison: the unmasked update ("raw" eval mode: the pretrained model, for PiSSA)
    loradrop.set_eval_mode(model, "raw")
    model.eval()
    with torch.no_grad():
        single = model.generate(**enc, max_new_tokens=24, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    new = single.sequences[:, enc["input_ids"].shape[1]:]
    ents = torch.stack([entropy(s.float().softmax(-1)) for s in single.scores], 1)
    ended = (new == tokenizer.eos_token_id).long().cumsum(1)
    mask = (ended == 0) | ((ended == 1) & (new == tokenizer.eos_token_id))  # up to and including the first eos
    single_texts, single_right = graded(new, mask)
    max_ent = sequence_scores(ents, torch.zeros_like(ents), mask)["max_entropy"]
    report["single_accuracy"] = single_right.double().mean().item()
    if single_right.any() and (~single_right).any():
        report["single_max_entropy"] = {
            "right": max_ent[single_right].mean().item(), "wrong": max_ent[~single_right].mean().item(),
            "auroc_wrong_vs_right": ood_detection(max_ent[single_right], max_ent[~single_right])["auroc"]}
    for (q, _), text, ok, mi, h, s_text, s_ok in zip(FACTS, texts, right, out.sequence_mutual_information,
                                                     out.sequence_max_entropy, single_texts, single_right):
        print(f"{'right' if ok else 'WRONG'} MI {mi:.3f} Hmax {h:.2f} | {q} -> {text!r} | single "
              f"{'right' if s_ok else 'WRONG'}: {s_text!r}")
    print(report)
    # the finding docs/UNCERTAINTY.md reports, checked: wrong answers get higher sequence uncertainty than right ones
    assert report["right"] and report["wrong"], report
    for name in ("ensemble_mutual_information", "ensemble_max_entropy"):
        assert report[name]["wrong"] > report[name]["right"] and report[name]["auroc_wrong_vs_right"] > 0.5, report
