"""The supported PEFT / transformers range, and the PEFT internals loradrop builds on.

pyproject.toml bounds both libraries from above: loradrop uses PEFT's `LoraVariant` extension point (documented by
PEFT as "prone to change"), overrides AdaLoRA's `SVDLinear` per instance with a copy of its forward, and wraps
AdaLoRA's `RankAllocator`. A new PEFT or transformers release is supported once these tests (and the suite) pass on
it and the upper bounds are raised.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from peft import AdaLoraConfig, get_peft_model

from helpers import OneLinear, lora_config

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("peft", "transformers")


def requirement(name: str) -> Requirement:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        if canonicalize_name(req.name) == name:
            return req
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def parameters(func) -> list[str]:
    return list(inspect.signature(func).parameters)


# ------------------------------------------------------------------------------------------------ the version range
@pytest.mark.parametrize("name", PINNED)
def test_installed_version_is_in_the_supported_range(name):
    req = requirement(name)
    operators = {spec.operator for spec in req.specifier}
    assert ">=" in operators and "<" in operators, f"pyproject.toml must bound {name} from below and above: {req}"
    installed = Version(importlib.metadata.version(name))
    assert req.specifier.contains(installed, prereleases=True), (
        f"{name} {installed} is outside the supported range {req.specifier} (pyproject.toml); run the suite on it "
        "and move the bound, or install a supported version"
    )


@pytest.mark.parametrize("name", PINNED)
def test_the_pinned_test_environment_is_in_the_supported_range(name):
    constraints = ROOT / "constraints.txt"
    if not constraints.is_file():
        pytest.skip("no constraints.txt")
    pins = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            pin_name, version = line.split("==")
            pins[canonicalize_name(pin_name)] = Version(version)
    assert name in pins, f"constraints.txt does not pin {name}"
    assert requirement(name).specifier.contains(pins[name], prereleases=True)


# ------------------------------------------------------------------------------------------------ PEFT LoRA
def test_lora_variant_api():
    """`layers.LoraDropoutVariant` implements PEFT's LoraVariant methods with these call shapes."""
    from peft.tuners.lora.layer import LoraVariant

    from loradrop.layers import LoraDropoutVariant

    assert parameters(LoraVariant.forward) == ["module", "active_adapter", "x", "result", "kwargs"]
    for method in ("merge_safe", "merge_unsafe", "unmerge"):
        assert parameters(getattr(LoraVariant, method)) == ["module", "active_adapter", "orig_weight"], method
    assert parameters(LoraVariant.init)[:2] == ["module", "adapter_name"]
    assert hasattr(LoraVariant, "supports_lora_conversion")
    # ours accepts every call PEFT makes (PEFT passes config= and more to init, and extra keywords to forward)
    ours = LoraDropoutVariant.__new__(LoraDropoutVariant)
    inspect.signature(ours.forward).bind(None, active_adapter="default", x=None, result=None, extra=1)
    inspect.signature(ours.init).bind(None, adapter_name="default", config=None)
    for method in ("merge_safe", "merge_unsafe", "unmerge"):
        inspect.signature(getattr(ours, method)).bind(None, "default", None)


def test_peft_lora_linear_dispatches_to_an_instance_variant():
    """PEFT's `lora.Linear` calls the variant found in the instance's ``lora_variant`` dict from its own forward,
    merge and unmerge: the extension point `LoraLinearHandler.install` uses."""
    from peft.tuners.lora.layer import Linear, LoraVariant

    calls = []

    class Recorder(LoraVariant):
        @staticmethod
        def init(module, adapter_name, **kwargs):
            return None

        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            calls.append(("forward", module, active_adapter))
            return result

        @staticmethod
        def merge_safe(module, active_adapter, orig_weight):
            calls.append(("merge_safe", module, active_adapter))
            return orig_weight.clone()

        @staticmethod
        def merge_unsafe(module, active_adapter, orig_weight):
            calls.append(("merge_unsafe", module, active_adapter))

        @staticmethod
        def unmerge(module, active_adapter, orig_weight):
            calls.append(("unmerge", module, active_adapter))
            return orig_weight

    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), lora_config(target_modules=["proj"]))
    layer = model.base_model.model.proj
    assert isinstance(layer, Linear) and isinstance(layer.lora_variant, dict)
    for name in ("lora_A", "lora_B", "lora_dropout", "scaling", "get_delta_weight"):
        assert hasattr(layer, name), name
    layer.lora_variant["default"] = Recorder()
    x = torch.randn(2, 48)
    assert torch.equal(model(x), layer.base_layer(x))  # the variant's result replaces plain LoRA's
    layer.merge(safe_merge=True)
    layer.unmerge()
    layer.merge()
    layer.unmerge()
    assert [c[0] for c in calls] == ["forward", "merge_safe", "unmerge", "merge_unsafe", "unmerge"]
    assert all(module is layer and adapter == "default" for _, module, adapter in calls)


# ------------------------------------------------------------------------------------------------ PEFT AdaLoRA
@pytest.fixture
def adalora():
    torch.manual_seed(0)
    return get_peft_model(OneLinear(), AdaLoraConfig(target_modules=["proj"], init_r=4, target_r=2, total_step=10))


def test_svdlinear_api(adalora):
    """`adalora_layer` replaces SVDLinear's forward/merge/unmerge/get_delta_weight per instance and calls PEFT's."""
    from peft.tuners.adalora import SVDLinear
    from peft.tuners.adalora.layer import AdaLoraLayer

    layer = adalora.base_model.model.proj
    assert isinstance(layer, SVDLinear) and isinstance(layer, AdaLoraLayer)
    for name in ("lora_A", "lora_B", "lora_E", "lora_dropout", "scaling", "ranknum", "merged_adapters",
                 "disable_adapters", "merged", "active_adapters", "base_layer"):
        assert hasattr(layer, name), name
    assert parameters(SVDLinear.forward)[:2] == ["self", "x"]
    assert parameters(SVDLinear.merge) == ["self", "safe_merge", "adapter_names"]
    assert parameters(SVDLinear.unmerge) == ["self"]
    assert parameters(SVDLinear.get_delta_weight) == ["self", "adapter"]
    assert parameters(SVDLinear._cast_input_dtype) == ["self", "x", "dtype"]

    # merge and unmerge look get_delta_weight up on the instance (where loradrop folds in the expected factor)
    looked_up = []
    original = layer.get_delta_weight
    layer.__dict__["get_delta_weight"] = lambda adapter: looked_up.append(adapter) or original(adapter)
    layer.merge()
    layer.unmerge()
    assert looked_up == ["default", "default"]


def test_svdlinear_forward_is_the_one_loradrop_mirrors():
    """loradrop overrides SVDLinear.forward with a copy that adds the masks; PEFT changing its forward needs a look
    at `adalora_layer._svd_forward` (a p = 0 parity test would not see a new feature it silently drops)."""
    from peft.tuners.adalora import SVDLinear

    source = inspect.getsource(SVDLinear.forward)
    for line in ("ranknum = self.ranknum[active_adapter] + 1e-5", "x = self._cast_input_dtype(x, lora_A.dtype)",
                 "result += (dropout(x) @ (lora_A * lora_E).T @ lora_B.T) * scaling / ranknum"):
        assert line in source, line
    assert "adapter_names" not in source  # no mixed-adapter batches (the copy has none)


def test_rank_allocator_api(adalora):
    """`adalora.adalora_step` and `AdaLoraCallback` drive and guard PEFT's rank allocator through these."""
    from peft.tuners.adalora import AdaLoraModel
    from peft.tuners.adalora.layer import RankAllocator
    from transformers import TrainerCallback
    from transformers.integrations import deepspeed_config

    tuner = adalora.base_model
    assert isinstance(tuner, AdaLoraModel) and tuner.trainable_adapter_name == "default"
    allocator = tuner.rankallocator
    assert isinstance(allocator, RankAllocator) and isinstance(allocator.init_bgt, int)
    assert isinstance(allocator.exp_avg_ipt, dict)
    assert parameters(RankAllocator.mask_to_budget) == ["self", "model", "budget"]
    assert parameters(RankAllocator.update_ipt) == ["self", "model"]
    assert parameters(AdaLoraModel.update_and_allocate) == ["self", "global_step"]
    assert isinstance(allocator.budget_schedule(1)[0], int)
    assert callable(deepspeed_config) and hasattr(TrainerCallback, "on_optimizer_step")
