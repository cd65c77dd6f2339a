"""LoRA Dropout on PEFT AdaLoRA layers (`peft.tuners.adalora.SVDLinear`).

AdaLoRA parametrises the update SVD-style, ``delta W = P diag(Λ) Q * s / ranknum`` with P = ``lora_B`` (out x r),
Λ = ``lora_E`` (r x 1) and Q = ``lora_A`` (r x in). LoRA Dropout masks rows of P (output features) and columns of Q
(input features), never Λ: Λ is what AdaLoRA's rank allocator prunes, and masking it would fight the allocator.
`AdaLoraSVDHandler` installs this on each `SVDLinear` *instance* (its ``forward``, ``get_delta_weight``, ``merge``
and ``unmerge`` are overridden in the instance ``__dict__``; PEFT's classes are untouched). The ``"rank"`` comparison
strategy drops whole triplets (P column, Λ entry, Q row).

With ``p = 0`` the layer runs PEFT's exact op order, so forward and gradients equal plain AdaLoRA bit for bit.

Merging: ``merge()`` (and so ``merge_and_unload()``) folds the *expected* update, ``factor * delta W`` with the
factor of the current eval mode, and ``unmerge()`` removes exactly what was merged, even if the eval mode changed in
between. Removing LoRA Dropout from a merged layer re-expresses the merged weight as plain AdaLoRA's ``W + delta W``.

The handler registers itself on import (`layers.register_layer_handler`); `loradrop.adalora` (the rank-allocation
driver) imports this module, so ``import loradrop`` registers it.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from peft.tuners.adalora import SVDLinear
from torch import nn

from .layers import LayerHandler, masked_lora_delta, register_layer_handler
from .masks import FeatureSlices
from .members import MemberController

_STATE = "_loradrop_adalora"
_OVERRIDES = ("forward", "get_delta_weight", "merge", "unmerge")


class _SVDState:
    """Per-layer-instance record of the adapters that run LoRA Dropout (kept in the layer's ``__dict__``)."""

    def __init__(self) -> None:
        self.adapters: dict[str, tuple[MemberController, FeatureSlices]] = {}
        self.merge_factor: dict[str, float] = {}  # factor each merged adapter was merged with


def _state(module: nn.Module) -> _SVDState:
    return module.__dict__[_STATE]


def _svd_forward(self: SVDLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`SVDLinear.forward` with LoRA Dropout for the adapters loradrop handles (same structure and op order)."""
    state = _state(self)
    if self.disable_adapters:
        if self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs)
    if self.merged:
        return self.base_layer(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for active_adapter in self.active_adapters:
        if active_adapter not in self.lora_A:
            continue
        lora_A = self.lora_A[active_adapter]
        lora_B = self.lora_B[active_adapter]
        lora_E = self.lora_E[active_adapter]
        dropout = self.lora_dropout[active_adapter]
        scaling = self.scaling[active_adapter]
        ranknum = self.ranknum[active_adapter] + 1e-5
        x = self._cast_input_dtype(x, lora_A.dtype)

        entry = state.adapters.get(active_adapter)  # None: an adapter loradrop does not handle
        plan = entry[0].plan_for(self.training) if entry is not None else None
        if plan is None or not plan.masked or entry[0].config.p == 0:  # p = 0 masks nothing
            # PEFT's exact ops (bit-for-bit parity); only the eval mode's factor may scale the update
            factor = entry[0].expected_factor if plan is not None else 1.0
            scale = scaling if factor == 1.0 else scaling * factor
            result += (dropout(x) @ (lora_A * lora_E).T @ lora_B.T) * scale / ranknum
            continue
        controller, slices = entry
        # Λ is folded into Q first, so masking columns of (Q * Λ) masks columns of Q and never touches Λ.
        # scaling=1.0 is exact (x * 1.0 == x), and `* scaling / ranknum` then repeats PEFT's last two ops.
        delta = masked_lora_delta(dropout(x), lora_A * lora_E, lora_B, None, 1.0, plan, controller, slices)
        result += delta * scaling / ranknum
    return result


def _svd_get_delta_weight(self: SVDLinear, adapter: str) -> torch.Tensor:
    """PEFT's delta weight times the expected factor (or the factor the adapter was merged with)."""
    delta = type(self).get_delta_weight(self, adapter)
    state = _state(self)
    entry = state.adapters.get(adapter)
    if entry is None:
        return delta
    factor = state.merge_factor.get(adapter, entry[0].expected_factor)
    return delta if factor == 1.0 else delta * factor


def _svd_merge(self: SVDLinear, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
    state = _state(self)
    # Record the factor before PEFT calls get_delta_weight, so unmerge later subtracts exactly what was added.
    recorded = []
    for adapter, (controller, _) in state.adapters.items():
        if adapter not in self.merged_adapters and adapter not in state.merge_factor:
            state.merge_factor[adapter] = controller.expected_factor
            recorded.append(adapter)
    try:
        type(self).merge(self, safe_merge=safe_merge, adapter_names=adapter_names)
    finally:
        for adapter in recorded:
            if adapter not in self.merged_adapters:
                del state.merge_factor[adapter]


def _svd_unmerge(self: SVDLinear) -> None:
    state = _state(self)
    type(self).unmerge(self)  # pops an adapter, then calls get_delta_weight, which still sees its merge factor
    for adapter in list(state.merge_factor):
        if adapter not in self.merged_adapters:
            del state.merge_factor[adapter]


class AdaLoraSVDHandler(LayerHandler):
    """`peft.tuners.adalora.SVDLinear`: LoRA Dropout on rows of P (``lora_B``) and columns of Q (``lora_A``)."""

    peft_types = ("ADALORA",)

    def matches(self, module: nn.Module, adapter: str) -> bool:
        # Quantised variants (bnb, gptq) are separate classes with their own forward: leave them alone.
        return isinstance(module, SVDLinear) and type(module).forward is SVDLinear.forward and adapter in module.lora_A

    def dims(self, module: nn.Module, adapter: str) -> tuple[int, int, int]:
        r, in_features = module.lora_A[adapter].shape
        return in_features, module.lora_B[adapter].shape[0], r

    def check(self, name: str, module: nn.Module, adapter: str) -> None:
        state = module.__dict__.get(_STATE)
        if state is not None and adapter in state.adapters:
            raise ValueError(f"layer {name!r} already runs LoRA Dropout for adapter {adapter!r}")
        if state is None and any(n in module.__dict__ for n in _OVERRIDES):
            raise ValueError(
                f"layer {name!r} already has a per-instance forward/merge override from another library; "
                "loradrop will not stack on top of it"
            )

    def install(self, module: nn.Module, adapter: str, controller: MemberController, slices: FeatureSlices) -> None:
        state = module.__dict__.get(_STATE)
        if state is None:
            # Bound methods in the instance __dict__ shadow the class's; copy.deepcopy rebinds them to the copy.
            state = _SVDState()
            module.__dict__[_STATE] = state
            module.__dict__["forward"] = types.MethodType(_svd_forward, module)
            module.__dict__["get_delta_weight"] = types.MethodType(_svd_get_delta_weight, module)
            module.__dict__["merge"] = types.MethodType(_svd_merge, module)
            module.__dict__["unmerge"] = types.MethodType(_svd_unmerge, module)
        state.adapters[adapter] = (controller, slices)

    def uninstall(self, module: nn.Module, adapter: str, controller: MemberController) -> None:
        state = module.__dict__.get(_STATE)
        if state is None or adapter not in state.adapters or state.adapters[adapter][0] is not controller:
            return
        factor = state.merge_factor.pop(adapter, None)
        if factor is not None and factor != 1.0 and adapter in module.merged_adapters:
            # The base weight holds W + factor * dW and plain PEFT will later unmerge dW: make it W + dW now.
            with torch.no_grad():
                delta = type(module).get_delta_weight(module, adapter)
                module.get_base_layer().weight.data += (1.0 - factor) * delta
        del state.adapters[adapter]
        if not state.adapters:
            for name in _OVERRIDES:
                module.__dict__.pop(name, None)
            del module.__dict__[_STATE]

    def b_tensors(self, module: nn.Module, adapter: str) -> list[torch.Tensor]:
        return [module.lora_B[adapter]]


register_layer_handler(AdaLoraSVDHandler())
