"""torch.compile: LoRA Dropout compiles without per-layer graph breaks, never recompiles per step, and matches eager.

The masks are drawn in the model's pre-hook (excluded from the graph), so a new training step changes tensor
values only. `aot_eager` traces forward and backward like inductor does but needs no C++ compiler, so this runs in CI.
"""

import contextlib
import copy

import pytest
import torch
from peft import get_peft_model

import loradrop
from helpers import lora_config, tiny_bert_config
from loradrop import LoraDropoutConfig


def bert_pair(**config):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    # problem_type set up front: transformers assigns it on the first call otherwise, which itself recompiles
    base = BertForSequenceClassification(tiny_bert_config(problem_type="single_label_classification"))
    model = get_peft_model(base, lora_config(target_modules=["query", "value"]))
    twin = copy.deepcopy(model)
    for m in (model, twin):
        loradrop.apply_lora_dropout(m, LoraDropoutConfig(p=0.5, seed=3, **config))
        m.train()
    return model, twin


@pytest.mark.parametrize("config", [{}, {"samples": 3}, {"mask_scope": "example"}, {"strategy": "rank"},
                                    {"strategy": "input"}], ids=["ab", "samples3", "example", "rank", "input"])
def test_compiled_training_matches_eager_and_does_not_recompile(config):
    torch._dynamo.reset()
    model, eager = bert_pair(**config)
    compiled = torch.compile(model, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        batch = {"input_ids": torch.randint(0, 120, (4, 10), generator=gen),
                 "labels": torch.randint(0, 3, (4,), generator=gen)}
        # after warm-up (caches fill on the first calls), any recompilation is a failure
        strict = torch._dynamo.config.patch(error_on_recompile=True) if step >= 2 else contextlib.nullcontext()
        with strict:
            loss = compiled(**batch).loss
            loss.backward()
        ref = eager(**batch).loss
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6)
    assert loradrop.get_controller(model).step == 4  # the step counter advanced outside the graph


def test_compiled_ensemble_matches_eager():
    torch._dynamo.reset()
    model, eager = bert_pair()
    inputs = {"input_ids": torch.randint(0, 120, (3, 10), generator=torch.Generator().manual_seed(1))}
    compiled = torch.compile(model, backend="aot_eager")
    out = loradrop.ensemble_predict(compiled, inputs, 4, seed=2)
    ref = loradrop.ensemble_predict(eager, inputs, 4, seed=2)
    torch.testing.assert_close(out.member_probs, ref.member_probs, rtol=1e-5, atol=1e-6)
    assert out.mutual_information.max() > 0
