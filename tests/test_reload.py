"""Train, save, reload on the same base object: loradrop's per-layer state must not outlive its model (issue #13).

PEFT builds every new `PeftModel` on a base that already holds LoRA layers by *reusing* those layer objects
(``update_layer``), and keeps forward hooks on the base model. These tests follow PEFT's own reload pattern
(``test_save_load_inference``, ``test_get_peft_model_repeated_invocation``): save, load again onto the same base
object, and compare with a fresh plain PEFT model built on a fresh copy of the base.

Two bases: a custom module (plain `PeftModel`, whose forward calls the base model through its hooks) and a tiny BERT
classifier (`PeftModelForSequenceClassification`, whose forward calls the LoRA layers without the base's hooks).
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import loradrop
from helpers import lora_config, tiny_bert_config
from loradrop import LoraDropoutConfig
from loradrop.model import inactive_reason


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.down = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind in ("custom", "dora"):
        return Two()
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(tiny_bert_config())


def peft_config(kind: str):
    if kind in ("custom", "dora"):  # "dora": DoRA + LoRA Dropout (loradrop.dora) must detach the same way
        return lora_config(target_modules=["up", "down"], use_dora=kind == "dora")
    return lora_config(target_modules=["query", "value"], task_type="SEQ_CLS")


def inputs(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if kind in ("custom", "dora"):
        return {"x": torch.randn(3, 12, generator=gen)}
    return {"input_ids": torch.randint(0, 120, (3, 7), generator=gen)}


def run(model: nn.Module, kind: str, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(inputs(kind)["x"]) if kind in ("custom", "dora") else model(**inputs(kind)).logits


def assert_same_outputs(model: nn.Module, reference: nn.Module, kind: str) -> None:
    """Bit-identical outputs in eval and in train mode (where LoRA Dropout, if still attached, would mask)."""
    for train in (False, True):
        assert torch.equal(run(model, kind, train), run(reference, kind, train)), f"train={train}"


def trained(kind: str, tmp_path, **config) -> tuple[nn.Module, PeftModel]:
    """(base, loradrop model on it) after one training step, saved to tmp_path."""
    base = make_base(kind)
    model = get_peft_model(base, peft_config(kind))
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, samples=2, seed=0, **config))
    run(model, kind, train=True)  # a training call: masks drawn, the batch repeated inside the model
    model.save_pretrained(tmp_path)
    return base, model


def fresh_plain(kind: str, tmp_path) -> PeftModel:
    return PeftModel.from_pretrained(make_base(kind), str(tmp_path))


KINDS = pytest.mark.parametrize("kind", ["custom", "bert", "dora"])


@KINDS
def test_plain_peft_reload_on_the_same_base_is_plain_peft(kind, tmp_path):
    base, _ = trained(kind, tmp_path)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path))  # no loradrop
    reference = fresh_plain(kind, tmp_path)
    assert_same_outputs(reloaded, reference, kind)


@KINDS
def test_loradrop_reload_on_the_same_base(kind, tmp_path):
    base, first = trained(kind, tmp_path)
    first_eval = run(first, kind, train=False)
    reloaded = loradrop.from_pretrained(base, tmp_path)  # was refused: "already uses the LoRA variant ..."
    assert torch.equal(run(reloaded, kind, train=False), first_eval)
    assert loradrop.get_mask_state(reloaded) == {"seed": 0, "step": 1, "ensemble_calls": 0}
    out = loradrop.ensemble_predict(reloaded, inputs(kind), n=3, seed=0) if kind == "bert" else None
    assert out is None or out.mutual_information.shape == (3,)
    # the first model no longer runs LoRA Dropout: it says why instead of masking layers it no longer owns
    with pytest.raises(ValueError, match="another PeftModel"):
        loradrop.get_controller(first)
    loradrop.remove_lora_dropout(first)  # a no-op on a detached model: must not touch the reloaded one's state
    assert torch.equal(run(reloaded, kind, train=False), first_eval)
    assert loradrop.get_controller(reloaded).layers


@KINDS
def test_get_peft_model_twice_on_one_base(kind, tmp_path):
    base, _ = trained(kind, tmp_path)
    again = get_peft_model(base, peft_config(kind))  # PEFT's repeated invocation: fresh adapter on the same layers
    torch.manual_seed(0)
    reference = get_peft_model(make_base(kind), peft_config(kind))
    reference.load_state_dict(again.state_dict())
    assert_same_outputs(again, reference, kind)


@KINDS
def test_remove_then_reload_is_plain_peft(kind, tmp_path):
    base, model = trained(kind, tmp_path)
    loradrop.remove_lora_dropout(model)
    reference = fresh_plain(kind, tmp_path)
    assert_same_outputs(model, reference, kind)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path))
    assert_same_outputs(reloaded, reference, kind)


@KINDS
def test_unload_leaves_the_plain_base_model(kind, tmp_path):
    _, model = trained(kind, tmp_path)
    unloaded = model.unload()
    reference = make_base(kind)
    assert_same_outputs(unloaded, reference, kind)


@KINDS
def test_merge_and_unload_serves_the_expectation_and_nothing_else(kind, tmp_path):
    _, model = trained(kind, tmp_path)
    expected = run(model, kind, train=False)
    merged = model.merge_and_unload()  # documented: merging folds the expected factor in
    torch.testing.assert_close(run(merged, kind, train=False), expected)
    assert torch.equal(run(merged, kind, train=True), run(merged, kind, train=False))  # no masks, no repeats left


def test_reapply_after_reload_with_a_different_adapter_name(tmp_path):
    base, first = trained("custom", tmp_path)
    second = PeftModel.from_pretrained(base, str(tmp_path), adapter_name="other")
    run(second, "custom", train=True)  # through the base's hooks: the first model notices it lost its base
    with pytest.raises(ValueError, match="another PeftModel"):
        loradrop.get_controller(first)
    loradrop.apply_lora_dropout(second, LoraDropoutConfig(p=0.5, seed=1))
    assert run(second, "custom", train=True).shape == (3, 6)


def test_own_add_adapter_keeps_lora_dropout(tmp_path):
    _, model = trained("custom", tmp_path)
    with pytest.warns(UserWarning, match="added after apply_lora_dropout"):
        model.add_adapter("late", lora_config(target_modules=["up"]))  # update_layer on the guarded layers
    model.base_model.add_weighted_adapter(["default"], [1.0], "weighted", combination_type="linear")
    ctl = loradrop.get_controller(model)
    assert ctl.detached is None and inactive_reason(ctl) is None
    out = run(model, "custom", train=True)
    assert out.shape == (6, 6)  # samples=2: still the batch repeated for two members


def test_adalora_reload_on_the_same_base(tmp_path):
    from peft import AdaLoraConfig

    cfg = AdaLoraConfig(target_modules=["up", "down"], init_r=4, target_r=2, total_step=10, lora_alpha=8,
                        lora_dropout=0.0)
    base = make_base("custom")
    model = loradrop.apply_lora_dropout(get_peft_model(base, cfg), LoraDropoutConfig(p=0.5, seed=0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.3)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path))
    reference = fresh_plain("custom", tmp_path)
    assert_same_outputs(reloaded, reference, "custom")
