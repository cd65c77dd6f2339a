"""Unit tests of members.py: CallPlan, the batch helpers and the MemberController's plans and mask-stream state."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import loradrop
from helpers import OneLinear, lora_config
from loradrop import LoraDropoutConfig
from loradrop.masks import STREAM_ENSEMBLE, STREAM_TRAIN, FeatureSlices, derive_key, keep_mask
from loradrop.members import CallPlan, MemberController, batch_size_of, repeat_batch, split_members


def controller(num_features: int = 10, **config) -> MemberController:
    return MemberController(LoraDropoutConfig(**{"p": 0.5, "seed": 1, **config}), num_features=num_features)


# ------------------------------------------------------------------------------------------------ CallPlan and batches
def test_call_plan_is_frozen_and_compares_without_its_tensors():
    plan = CallPlan(masked=True, training=True, key=5, members=2)
    assert plan.member_offset == 0 and plan.mask is None and plan.weights is None and plan.input_key is None
    with pytest.raises(AttributeError):
        plan.key = 6
    assert plan == CallPlan(masked=True, training=True, key=5, members=2, mask=torch.ones(2, 3), weights=[None])
    assert plan != CallPlan(masked=True, training=True, key=5, members=None)


def test_batch_size_of_reads_the_usual_inputs():
    ids, embeds = torch.zeros(3, 7, dtype=torch.long), torch.zeros(4, 7, 8)
    assert batch_size_of((), {"input_ids": ids}) == 3
    assert batch_size_of((), {"attention_mask": torch.ones(9, 7), "inputs_embeds": embeds}) == 4  # named inputs first
    assert batch_size_of((torch.tensor(1.0), embeds), {}) == 4  # 0-dim tensors are not batches
    assert batch_size_of((), {"labels": [1, 2]}) is None


def test_repeat_batch_is_member_major_and_leaves_non_batch_values_alone():
    ids = torch.arange(6).view(2, 3)
    cache_position = torch.arange(2)  # first dimension equals the batch by accident
    args, kwargs = repeat_batch((), {"input_ids": ids, "attention_mask": torch.ones(2, 3), "other": torch.ones(5),
                                     "cache_position": cache_position, "num_items_in_batch": 12, "flag": True}, 3)
    assert args == ()
    assert torch.equal(kwargs["input_ids"], torch.cat([ids, ids, ids]))
    assert kwargs["attention_mask"].shape == (6, 3) and kwargs["other"].shape == (5,)
    assert kwargs["cache_position"] is cache_position and kwargs["flag"] is True
    assert kwargs["num_items_in_batch"] == 36  # the loss stays a mean over members
    args, _ = repeat_batch((ids,), {}, 2)
    assert torch.equal(args[0], torch.cat([ids, ids]))
    with pytest.raises(ValueError, match="could not find the batch"):
        repeat_batch((), {"labels": [1]}, 2)


def test_split_members():
    x = torch.arange(12).view(6, 2)
    members = split_members(x, 3)
    assert members.shape == (3, 2, 2) and torch.equal(members[1], x[2:4])
    with pytest.raises(ValueError, match="not a multiple of members=4"):
        split_members(x, 4)


# ------------------------------------------------------------------------------------------------ the controller
def test_controller_is_complete_at_construction():
    layers = [(nn.Linear(2, 2), "default", None), (nn.Linear(2, 2), "default", None)]
    slices = [FeatureSlices(0, a=(0, 4), b=(4, 9)), FeatureSlices(1, a=(9, 13), b=(13, 16))]
    ctl = MemberController(LoraDropoutConfig(seed=0), layers, slices, ["default"])
    assert ctl.num_features == 16 and ctl.layers == layers and ctl.slices == slices and ctl.adapters == ["default"]
    assert MemberController(LoraDropoutConfig(seed=0), layers, slices, num_features=20).num_features == 20
    with pytest.raises(ValueError, match="one FeatureSlices per layer"):
        MemberController(LoraDropoutConfig(seed=0), layers, slices[:1])


def test_applied_controller_knows_its_layers():
    torch.manual_seed(0)
    model = loradrop.apply_lora_dropout(get_peft_model(OneLinear(), lora_config(target_modules=["proj"])),
                                        LoraDropoutConfig(p=0.5, seed=0))
    ctl = loradrop.get_controller(model)
    (module, adapter, _), = ctl.layers
    assert module is model.base_model.model.proj and adapter == "default" and ctl.adapters == ["default"]
    assert ctl.slices == [FeatureSlices(0, a=(0, 48), b=(48, 88))] and ctl.num_features == 88


def test_seed_none_is_drawn_from_torch_and_a_given_seed_is_kept():
    torch.manual_seed(5)
    a = controller(seed=None)
    torch.manual_seed(5)
    assert controller(seed=None).seed == a.seed
    assert controller(seed=123).seed == 123


def test_state_round_trip_and_validation():
    ctl = controller()
    ctl.step, ctl.ensemble_calls = 7, 2
    other = controller(seed=9)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == {"seed": 1, "step": 7, "ensemble_calls": 2}
    other.load_state_dict({"seed": 3, "step": 0})  # older checkpoints have no ensemble_calls
    assert other.ensemble_calls == 0
    for bad in ({"seed": 1, "step": -1}, {"seed": "1", "step": 0}, {"step": 0}):
        with pytest.raises(ValueError, match="non-negative integer"):
            other.load_state_dict(bad)


def test_masks_are_a_function_of_key_member_and_feature():
    ctl = controller(num_features=30)
    plan = CallPlan(masked=True, training=True, key=77, members=5)
    full = ctl.masks(plan, 5, torch.device("cpu"), torch.float32)
    assert full.shape == (5, 30)
    assert torch.equal(full, keep_mask(77, torch.arange(5), torch.arange(30), 0.5))
    assert ctl.masks(plan, 5, torch.device("cpu"), torch.float32) is full  # cached for the call
    chunk = ctl.masks(CallPlan(masked=True, training=True, key=77, members=2, member_offset=3), 2,
                      torch.device("cpu"), torch.float32)
    assert torch.equal(chunk, full[3:5])  # chunking members does not change any member
    rescaled = controller(num_features=30, rescale=True).masks(plan, 5, torch.device("cpu"), torch.float64)
    assert rescaled.dtype == torch.float64 and torch.equal(rescaled != 0, full != 0)
    assert set(rescaled.unique().tolist()) == {0.0, 2.0}  # kept entries carry 1 / (1 - p)


def test_plan_outside_a_hooked_call():
    ctl = controller(mask_scope="example")
    assert ctl.plan_for(False) == CallPlan(masked=False, training=False)
    ctl.step = 4
    assert ctl.plan_for(True) == CallPlan(masked=True, training=True, key=derive_key(1, STREAM_TRAIN, 4), members=None)
    assert controller().plan_for(True).members == 1


def test_training_calls_advance_the_step_once_and_eval_calls_do_not():
    module = nn.Linear(3, 3)
    ctl = controller(samples=3)
    x = torch.randn(2, 3)
    module.train()
    args, kwargs = ctl.pre_hook(module, (x,), {})
    assert args[0].shape == (6, 3) and ctl.step == 1
    assert ctl._plan == CallPlan(masked=True, training=True, key=derive_key(1, STREAM_TRAIN, 0), members=3)
    assert ctl.pre_hook(module, (args[0],), {}) is None  # an inner hooked module of the same call: no new plan
    ctl.post_hook(module, (), {}, None)
    ctl.post_hook(module, (), {}, None)
    ctl.post_hook(module, (), {}, None)  # a surplus post-hook never drives the depth below zero
    assert ctl._depth == 0 and ctl.step == 1
    module.eval()
    assert ctl.pre_hook(module, (x,), {}) is None and ctl.step == 1 and not ctl._plan.masked
    ctl.post_hook(module, (), {}, None)


def test_member_chunks_run_one_step_in_chunks():
    module = nn.Linear(3, 3).train()
    ctl = controller(samples=5, member_chunk=2)
    seen = []
    for offset, size in ctl.member_chunks():
        repeated = ctl.pre_hook(module, (torch.randn(4, 3),), {})  # None: one member, the batch as it is
        ctl.post_hook(module, (), {}, None)
        rows = repeated[0][0].shape[0] if repeated is not None else 4
        seen.append((offset, size, ctl._plan.member_offset, ctl._plan.members, rows))
        with pytest.raises(RuntimeError, match="cannot be nested"):
            next(iter(ctl.member_chunks()))
    assert seen == [(0, 2, 0, 2, 8), (2, 2, 2, 2, 8), (4, 1, 4, 1, 4)]
    assert ctl.step == 1 and ctl._chunk is None


def test_ensemble_keys_and_blocks():
    ctl = controller()
    assert ctl.ensemble_key(4) == ctl.ensemble_key(4) == derive_key(4, STREAM_ENSEMBLE, 0, 0)
    fresh = {ctl.ensemble_key(None) for _ in range(3)}
    assert len(fresh) == 3 and ctl.ensemble_calls == 3  # a fresh ensemble per call, part of the saved state
    module = nn.Linear(3, 3).train()
    with ctl.ensemble(9, 4, 2):
        args, _ = ctl.pre_hook(module, (torch.randn(2, 3),), {})
        ctl.post_hook(module, (), {}, None)
        assert ctl._plan == CallPlan(masked=True, training=True, key=9, members=4, member_offset=2)
        assert args[0].shape == (8, 3) and ctl.step == 0  # an ensemble consumes no training masks
        with pytest.raises(RuntimeError, match="cannot be nested"), ctl.ensemble(9, 1, 0):
            pass
    assert ctl._plan is None and ctl._ensemble is None and not ctl.precompute.holds_copies


def test_expected_factor_follows_the_eval_mode():
    ctl = controller(p=0.5)
    assert ctl.expected_factor == 0.25
    ctl.eval_mode = "raw"
    assert ctl.expected_factor == 1.0


def test_deep_copy_after_a_training_call():
    """The plan kept after a training call holds masked weights inside the autograd graph; a deep copy (merged
    exports, Trainer internals) must still work, start without that plan and continue the same mask stream."""
    torch.manual_seed(0)
    model = loradrop.apply_lora_dropout(get_peft_model(OneLinear(), lora_config(target_modules=["proj"])),
                                        LoraDropoutConfig(p=0.5, seed=0))
    x = torch.randn(3, 48)
    model.train()
    model(x).sum().backward()
    clone = copy.deepcopy(model)
    ctl, clone_ctl = loradrop.get_controller(model), loradrop.get_controller(clone)
    assert clone_ctl is not ctl and clone_ctl._plan is None and clone_ctl.state_dict() == ctl.state_dict()
    assert clone_ctl.layers[0][0] is clone.base_model.model.proj  # the copy's controller drives the copy's layers
    torch.testing.assert_close(clone(x), model(x))
    assert clone_ctl.step == ctl.step == 2
