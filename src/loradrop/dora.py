"""DoRA + LoRA Dropout on `peft.tuners.lora.Linear` (PEFT ``LoraConfig(use_dora=True)``), incl. GPT-2 ``Conv1D``.

PEFT runs one `LoraVariant` per layer and adapter, and both DoRA and LoRA Dropout are variants, so they are composed
here: `LoraDropoutDoraVariant` replaces PEFT's `DoraLinearVariant` on the layer, keeps it (``inner``) and puts it
back on removal. PEFT's DoRA layer (the magnitude ``m``, ``module.lora_magnitude_vector[adapter]``) is used as it is.

DoRA (Liu et al. 2024, PEFT's `DoraLinearLayer`): ``y = m / ||W0 + s B A||_row * (W0 + s B A) x + bias``, the norm
taken per output row and detached from the gradient graph (paper section 4.3). With LoRA Dropout, member ``k`` uses
its masked factors ``Ã_k = A * mA_k`` (columns) and ``B̃_k = B * mB_k`` (rows), in the update AND in the norm:

    n_k = ||W0 + s B̃_k Ã_k||_row   (detached)        y_k = m / n_k * (W0 + s B̃_k Ã_k) x + bias

so each member is exactly a DoRA layer whose LoRA factors are that member's masked ones. ``"input"`` is PEFT's own
``lora_dropout`` under DoRA: the member's dropped input ``x̃_k`` enters both W0 and the LoRA part and the norm is
the unmasked one, ``y_k = W0 x + bias + (m/n - 1) W0 x̃_k + m/n s B A x̃_k`` (as PEFT computes DoRA with dropout).

Eval (no masks) is the DoRA forward of the *expected* update: ``n_E = ||W0 + s E[B̃ Ã]||_row`` with
``E[B̃ Ã] = f B A`` (f = `LoraDropoutConfig.expected_factor`, e.g. (1-p)^2 for "ab"), ``y = m / n_E (W0 + f s B A) x
+ bias``. Because the norm is non-linear this is not the mean of the members' outputs (it is the DoRA layer of the
mean update); merging and `export_adapter` (f folded into lora_B) serve exactly this eval forward.

Cost: the per-member norms need ``W0 + s B̃_k Ã_k`` for every member, M x out x in numbers per layer built under
``no_grad`` and freed at once (PEFT's DoRA builds one out x in matrix per forward for its norm); the members'
LoRA matmuls are the batched ones of `layers.member_matmuls`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import dequantize_module_weight
from peft.utils.other import transpose
from torch import nn

from .layers import (
    LoraDropoutVariant,
    VariantHandler,
    input_dropout,
    masked_weights,
    member_matmuls,
    members_of,
    refuse_variant,
    register_layer_handler,
)
from .masks import FeatureSlices
from .members import MemberController


@contextlib.contextmanager
def _scaled(module: nn.Module, adapter: str, factor: float) -> Iterator[None]:
    """``module.scaling[adapter]`` times `factor` inside the block, so that PEFT's own DoRA merge/unmerge (which read
    the scaling through ``get_delta_weight``) merge the expected update; reusing PEFT's code keeps its weight-norm
    caching and multi-adapter replay intact instead of copying them."""
    original = module.scaling[adapter]
    module.scaling[adapter] = original * factor
    try:
        yield
    finally:
        module.scaling[adapter] = original


class LoraDropoutDoraVariant(LoraDropoutVariant):
    """LoRA Dropout inside DoRA's normalised update, for one adapter of one DoRA `lora.Linear` layer."""

    def __init__(self, controller: MemberController, slices: FeatureSlices, inner: DoraLinearVariant) -> None:
        super().__init__(controller, slices)
        self.inner = inner  # PEFT's DoRA variant: p = 0 and unscaled eval run it, removal puts it back

    def supports_lora_conversion(self) -> bool:
        return self.inner.supports_lora_conversion()

    # ---- merge: PEFT's DoRA merge of the expected update (f folded into the scaling while it runs)
    def merge_safe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        factor = self._merged_factor[active_adapter] = self.controller.expected_factor
        with _scaled(module, active_adapter, factor):
            return self.inner.merge_safe(module, active_adapter, orig_weight)

    def merge_unsafe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        factor = self._merged_factor[active_adapter] = self.controller.expected_factor
        with _scaled(module, active_adapter, factor):
            self.inner.merge_unsafe(module, active_adapter, orig_weight)

    def unmerge(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        factor = self._merged_factor.pop(active_adapter, self.controller.expected_factor)
        with _scaled(module, active_adapter, factor):
            return self.inner.unmerge(module, active_adapter, orig_weight)

    # ---- forward
    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        controller = self.controller
        plan = controller.plan_for(module.training)
        if not plan.masked or controller.config.p == 0:
            factor = controller.expected_factor
            if factor == 1.0:  # p = 0, "raw" eval, "input": PEFT's DoRA itself (bit for bit)
                return self.inner.forward(module, active_adapter, x, result, **kwargs)
            return self._expected(module, active_adapter, x, result, factor)
        return self._members(module, active_adapter, x, result, plan)

    @staticmethod
    def _expected(module: nn.Module, adapter: str, x: torch.Tensor, result: torch.Tensor,
                  factor: float) -> torch.Tensor:
        """PEFT's DoRA forward (`DoraLinearVariant.forward`) with the update s B A replaced by f s B A."""
        dropout = module.lora_dropout[adapter]
        if isinstance(dropout, nn.Identity) or not module.training:
            base_result = result
        else:
            x, base_result = dropout(x), None
        # the cache key names the factor: PEFT caches the weight norm per key when ENABLE_DORA_CACHING is on
        return result + module.lora_magnitude_vector[adapter](
            x, lora_A=module.lora_A[adapter], lora_B=module.lora_B[adapter], scaling=module.scaling[adapter] * factor,
            base_layer=module.get_base_layer(), base_result=base_result, adapter_name=f"{adapter}@loradrop{factor!r}")

    def _members(self, module: nn.Module, adapter: str, x: torch.Tensor, result: torch.Tensor, plan) -> torch.Tensor:
        controller, slices = self.controller, self.slices
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        dropout, scaling = module.lora_dropout[adapter], module.scaling[adapter]
        base_layer = module.get_base_layer()
        weight = transpose(dequantize_module_weight(base_layer), module.fan_in_fan_out).to(x.dtype)  # (out, in)
        magnitude = module.lora_magnitude_vector[adapter].weight  # (out,)
        bias = base_layer.bias
        members = members_of(plan, x)
        if isinstance(dropout, nn.Identity):
            base_result = result if bias is None else result - bias  # W0 x, as PEFT's DoRA takes it
        else:  # PEFT's lora_dropout under DoRA drops the input of W0's part too
            x = dropout(x)
            base_result = None
        if controller.config.strategy == "input":  # member-wise lora_dropout: PEFT's DoRA with a dropped input
            x = input_dropout(x, plan, controller, slices, members)
            base_result = None
            a, b, s = lora_a.weight, lora_b.weight, scaling
        else:
            pre = plan.weights[slices.layer_index] if plan.weights is not None else None
            if pre is not None and plan.mask is not None and plan.mask.shape[0] == members:  # scaling folded in
                a = pre[0] if pre[0] is not None else lora_a.weight
                b = pre[1] if pre[1] is not None else lora_b.weight
                s = 1.0
            else:
                mask = controller.masks(plan, members, lora_a.weight.device, lora_a.weight.dtype)
                a, b, _ = masked_weights(lora_a.weight, lora_b.weight, None, mask, slices, members)
                s = scaling
        if base_result is None:
            base_result = F.linear(x, weight)
        with torch.no_grad():  # the norm is detached, as in DoRA (paper section 4.3) and PEFT
            update = torch.matmul(b, a).to(weight.dtype)  # (M, out, in), or (out, in) for "input"
            norm = torch.linalg.norm(weight + s * update, dim=-1).to(weight.dtype)  # (M, out) or (out,)
        scale = (magnitude / norm).view(-1, 1, magnitude.shape[0])  # (M or 1, 1, out)
        lora = member_matmuls(x, a, b, None, s, members)
        rows = (scale.shape[0], -1, magnitude.shape[0])
        out = (scale - 1) * base_result.reshape(rows) + scale * lora.reshape(rows)
        return result + out.view(result.shape)


class DoraLinearHandler(VariantHandler):
    """`peft.tuners.lora.Linear` with PEFT's DoRA variant (``use_dora=True``), incl. GPT-2 ``Conv1D``."""

    peft_types = ("LORA",)
    variant_class = LoraDropoutDoraVariant

    def matches(self, module: nn.Module, adapter: str) -> bool:
        return (isinstance(module, Linear) and type(module).forward is Linear.forward and adapter in module.lora_A
                and isinstance(module.lora_variant.get(adapter), (DoraLinearVariant, LoraDropoutDoraVariant)))

    def dims(self, module: nn.Module, adapter: str) -> tuple[int, int, int]:
        r, in_features = module.lora_A[adapter].weight.shape
        return in_features, module.lora_B[adapter].weight.shape[0], r

    def check(self, name: str, module: nn.Module, adapter: str) -> None:
        if isinstance(module.lora_variant.get(adapter), LoraDropoutVariant):
            refuse_variant(name, module, adapter)  # another model's LoRA Dropout: refused with its message
        if type(module.lora_variant[adapter]) is not DoraLinearVariant:
            refuse_variant(name, module, adapter)  # a subclass may change DoRA's forward: not composed

    def install(self, module: nn.Module, adapter: str, controller: MemberController, slices: FeatureSlices) -> None:
        module.lora_variant[adapter] = LoraDropoutDoraVariant(controller, slices, module.lora_variant[adapter])

    def uninstall(self, module: nn.Module, adapter: str, controller: MemberController) -> None:
        variant = module.lora_variant.get(adapter)
        if isinstance(variant, LoraDropoutDoraVariant) and variant.controller is controller:
            module.lora_variant[adapter] = variant.inner  # plain PEFT DoRA again

    def b_tensors(self, module: nn.Module, adapter: str) -> list[torch.Tensor]:
        return [module.lora_B[adapter].weight]

    def precompute_weights(self, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return module.lora_A[adapter].weight, module.lora_B[adapter].weight


register_layer_handler(DoraLinearHandler())
