"""The member-aware LoRA computation, attached to PEFT LoRA layers through PEFT's `LoraVariant` extension point.

Masks act on the small A (r x in) and B (out x r) weights, never on activations (except the "input" strategy, which
exists to reproduce PEFT's element-wise ``lora_dropout``). For M members the layer input is viewed as
(M, rows_per_member, in) and each member multiplies by its own masked copies of A and B:

    A_m = A * mA[m]  (columns of A)        B_m = B * mB[m, :, None]  (rows of B)
    delta_m = (x_m A_m^T) B_m^T * s

so the extra memory is M * r * (in + out) numbers, whatever the batch or sequence length. The all-layer version of
the masking (one call's masked copies of every layer at once) is `precompute.WeightPrecompute`, run by the
controller's pre-hook; a layer uses those copies when the plan carries them and masks its own weights otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from .masks import STREAM_INPUT, FeatureSlices, derive_key, fold_key, plan_slices, uniform  # noqa: F401 - re-exported
from .members import CallPlan, MemberController


def members_of(plan: CallPlan, x: torch.Tensor) -> int:
    members = plan.members if plan.members is not None else x.shape[0]
    if x.dim() < 2 or x.shape[0] % members:
        raise RuntimeError(
            f"loradrop: an adapted layer got input of shape {tuple(x.shape)}, whose first dimension is not a "
            f"multiple of the {members} members of this call; the batch must be the first dimension"
        )
    return members


def input_dropout(x: torch.Tensor, plan: CallPlan, controller: MemberController, slices: FeatureSlices,
                  members: int) -> torch.Tensor:
    """Element-wise inverted dropout of the layer input, one independent draw per member (the "input" strategy).

    The keep decision is kept as a bool tensor (what autograd saves for backward is 1 byte per element, as for
    ``nn.Dropout``), and the index tensors are cached per size and device.
    """
    cfg = controller.config
    per_member = x.numel() // members
    if plan.input_key is not None and plan.input_key.device == x.device:
        key = fold_key(plan.input_key, slices.layer_index)  # == derive_key(plan.key, STREAM_INPUT, layer), as data
    else:
        key = derive_key(plan.key, STREAM_INPUT, slices.layer_index)
    member_ids = controller.index(members, x.device, offset=plan.member_offset)
    keep = (uniform(key, member_ids, controller.index(per_member, x.device)) >= cfg.p).view_as(x)
    kept = x * cfg.keep_scale if cfg.keep_scale != 1.0 else x
    return torch.where(keep, kept, 0.0)


def _fused_add(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """``result + scaling * h @ b^T`` as ONE matmul with a fused epilogue (addmm / baddbmm), or None if it can't be.

    h is (rows, r) or (M, rows, r) with b (out, r) or (M, out, r). Fusing the scale and the add into the matmul saves
    two element-wise kernels per layer, which is what decides step time when the GPU waits on kernel launches. It
    needs one dtype for the three tensors (or autocast, which casts them alike).
    """
    if not (result.dtype == h.dtype == b.dtype or torch.is_autocast_enabled(result.device.type)):
        return None
    out_features = b.shape[-2]
    if h.dim() == 2:
        fused = torch.addmm(result.reshape(-1, out_features), h, b.t(), alpha=scaling)
    else:
        fused = torch.baddbmm(result.reshape(h.shape[0], -1, out_features), h, b.transpose(1, 2), alpha=scaling)
    return fused.view(result.shape)


def masked_weights(
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    mask: torch.Tensor | None,
    slices: FeatureSlices,
    members: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The members' masked copies of A and B (and B's bias): (M, r, in), (M, out, r) and (M, out). Unmasked sides are
    returned as they are, unbatched."""
    a, b, bias = weight_a, weight_b, bias_b
    if mask is None:
        return a, b, bias
    # Always the batched (M, ...) form, also for one member: bmm/baddbmm on 3-d views dispatch fewer operators than
    # linear on (batch, seq, features) inputs, and operator count is what a launch-bound GPU step pays for.
    if slices.a is not None:
        a = a * mask[:, None, slices.a[0]:slices.a[1]]  # columns of A
    if slices.rank is not None:
        a = a * mask[:, slices.rank[0]:slices.rank[1], None]  # rows of A (rank components)
    if slices.b is not None:
        b = b * mask[:, slices.b[0]:slices.b[1], None]  # rows of B
        if bias is not None:
            bias = bias * mask[:, slices.b[0]:slices.b[1]]
    return a, b, bias


def masked_lora_delta(
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    scaling: float,
    plan: CallPlan,
    controller: MemberController,
    slices: FeatureSlices,
    result: torch.Tensor | None = None,
) -> torch.Tensor:
    """s * B_m A_m x for every member m, as one (batched) matmul chain.

    Returns the delta shaped like the layer output, or ``result + delta`` when `result` is given (then the add and
    the scale are fused into the last matmul where the dtypes allow).
    """
    members = members_of(plan, x)
    if controller.config.strategy == "input":
        x = input_dropout(x, plan, controller, slices, members)
        a, b, bias = weight_a, weight_b, bias_b
    else:
        mask = controller.masks(plan, members, weight_a.device, weight_a.dtype)
        a, b, bias = masked_weights(weight_a, weight_b, bias_b, mask, slices, members)
    return member_matmuls(x, a, b, bias, scaling, members, result)


def member_matmuls(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, scaling: float,
                   members: int, result: torch.Tensor | None = None) -> torch.Tensor:
    """``[result +] s * (x_m a_m^T b_m^T + bias_m)`` with a, b either shared (2-d) or per member (3-d)."""
    if a.dim() == 2 and b.dim() == 2:  # nothing masked per member ("input")
        h = F.linear(x, a)
        if result is not None and bias is None:
            fused = _fused_add(result, h.reshape(-1, h.shape[-1]), b, scaling)
            if fused is not None:
                return fused
        delta = F.linear(h, b, bias) * scaling
        return delta if result is None else result + delta
    xm = x.reshape(members, -1, x.shape[-1])
    h = torch.bmm(xm, a.transpose(1, 2)) if a.dim() == 3 else F.linear(xm, a)  # (M, rows, r)
    if b.dim() == 2:  # B unmasked ("a", "rank"): one weight for all members
        b = b.expand(members, *b.shape)
        if bias is not None:
            bias = bias.expand(members, *bias.shape)
    if result is not None and bias is None:
        fused = _fused_add(result, h, b, scaling)
        if fused is not None:
            return fused
    out = torch.bmm(h, b.transpose(1, 2))
    if bias is not None:
        out = out + bias[:, None, :]
    delta = out.view(*x.shape[:-1], b.shape[-2])
    if scaling != 1.0:
        delta = delta * scaling
    return delta if result is None else result + delta


class LoraDropoutVariant(LoraVariant):
    """PEFT `LoraVariant` that runs LoRA Dropout for one adapter of one `peft.tuners.lora.Linear` layer.

    It is installed per layer instance into ``layer.lora_variant[adapter]``; PEFT's classes are not modified.
    """

    def __init__(self, controller: MemberController, slices: FeatureSlices) -> None:
        self.controller = controller
        self.slices = slices
        self._merged_factor: dict[str, float] = {}

    def supports_lora_conversion(self) -> bool:
        return True

    # PEFT calls these on the instance with the layer as first argument.
    def init(self, module: nn.Module, adapter_name: str, **kwargs) -> None:  # noqa: D401 - PEFT hook
        return None

    def _delta_weight(self, module: nn.Module, adapter: str, factor: float) -> torch.Tensor:
        return module.get_delta_weight(adapter) * factor

    @staticmethod
    def _shift_base_bias(module: nn.Module, adapter: str, amount: float) -> None:
        """Add ``amount * s * lora_B.bias`` to the base layer's bias (PEFT ``lora_bias``; nothing without it).

        PEFT merges lora_B's bias itself, always in full (``base.bias += s * lora_B.bias``, after the variant's merge
        and before its unmerge); shifting by (bias factor - 1) around that makes the merged bias the expected one."""
        lora_bias = module.lora_B[adapter].bias
        base_bias = getattr(module.get_base_layer(), "bias", None)
        if lora_bias is None or base_bias is None or amount == 0.0:  # no base bias: PEFT's merge raises itself
            return
        base_bias.data += (lora_bias.detach() * (module.scaling[adapter] * amount)).to(base_bias.dtype)

    def _merge(self, module: nn.Module, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        factor, bias_factor = self.controller.expected_factor, self.controller.expected_bias_factor
        self._merged_factor[adapter] = (factor, bias_factor)
        return self._delta_weight(module, adapter, factor).to(weight.dtype)

    def merge_safe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        merged = orig_weight + self._merge(module, active_adapter, orig_weight)
        if module.lora_B[active_adapter].bias is not None and bool(torch.isfinite(merged).all()):
            # (PEFT refuses non-finite merged weights after this call: then the base bias must stay untouched)
            self._shift_base_bias(module, active_adapter, self._merged_factor[active_adapter][1] - 1.0)
        return merged

    def merge_unsafe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += self._merge(module, active_adapter, orig_weight)
        self._shift_base_bias(module, active_adapter, self._merged_factor[active_adapter][1] - 1.0)

    def unmerge(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        factor, bias_factor = self._merged_factor.pop(
            active_adapter, (self.controller.expected_factor, self.controller.expected_bias_factor))
        self._shift_base_bias(module, active_adapter, 1.0 - bias_factor)
        return orig_weight - self._delta_weight(module, active_adapter, factor).to(orig_weight.dtype)

    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        return self.add_update(module, active_adapter, x, result)

    def add_update(self, module: nn.Module, active_adapter: str, x: torch.Tensor,
                   result: torch.Tensor | None) -> torch.Tensor:
        """``result`` plus the adapter's update (masked per member, or the expected one), or the update alone when
        `result` is None (PEFT's quantised layers cast the update to the base output's dtype before adding it)."""
        lora_a = module.lora_A[active_adapter]
        lora_b = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        plan = self.controller.plan_for(module.training)
        if not plan.masked or self.controller.config.p == 0:  # p = 0: PEFT's exact ops, bit for bit
            factor = self.controller.expected_factor
            if factor == 1.0:
                return _plus(result, lora_b(lora_a(dropout(x))) * scaling)
            if lora_b.bias is not None:  # lora_bias: the bias has its own expected factor (see expected_bias_factor)
                bias = lora_b.bias * self.controller.expected_bias_factor
                return _plus(result, (F.linear(lora_a(dropout(x)), lora_b.weight) * factor + bias) * scaling)
            return _plus(result, lora_b(lora_a(dropout(x))) * (scaling * factor))
        if not isinstance(dropout, nn.Identity):
            x = dropout(x)
        pre = plan.weights[self.slices.layer_index] if plan.weights is not None else None
        # masked copies of this call, scaling folded in (when this layer sees the rows the call was planned for)
        if pre is not None and plan.mask is not None and plan.mask.shape[0] == members_of(plan, x):
            a = pre[0] if pre[0] is not None else lora_a.weight
            b = pre[1] if pre[1] is not None else lora_b.weight
            return member_matmuls(x, a, b, None, 1.0, plan.mask.shape[0], result)
        return masked_lora_delta(x, lora_a.weight, lora_b.weight, lora_b.bias, scaling, plan,
                                 self.controller, self.slices, result)


def _plus(result: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
    return update if result is None else result + update


def refuse_variant(name: str, module: nn.Module, adapter: str) -> None:
    """Raise ValueError naming PEFT's LoRA variant on (module, adapter), the config option that chose it, and why.

    LoRA Dropout is itself a `LoraVariant`: PEFT runs one variant per adapter and layer, and installing ours would
    replace the other variant's forward and merge (DoRA's magnitude normalisation, VeLoRA's ...), silently training
    a different model. So every layer that already has a variant is refused."""
    existing = module.lora_variant.get(adapter)
    if existing is None:
        return
    if isinstance(existing, LoraDropoutVariant):
        raise ValueError(
            f"layer {name!r} already runs LoRA Dropout for adapter {adapter!r} under another PeftModel that shares "
            "this base model object; call loradrop.remove_lora_dropout on that model first"
        )
    options = [keys for keys, cls in getattr(module, "lora_variants", {}).items() if type(existing) is cls]
    option = f" (LoraConfig {', '.join(options[0])})" if options else ""
    if type(existing).__name__.startswith("Dora"):  # loradrop.dora composes DoRA on lora.Linear only
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) uses {type(existing).__name__}{option} for adapter "
            f"{adapter!r}: DoRA + LoRA Dropout is composed for lora.Linear layers only; DoRA's norm on "
            f"{type(module).__name__} layers (per embedding dimension / output channel) is not composed with "
            "per-member masks, so it is refused rather than silently replacing DoRA (see docs/COVERAGE.md)"
        )
    raise ValueError(
        f"layer {name!r} already uses the LoRA variant {type(existing).__name__}{option} for adapter {adapter!r}. "
        "LoRA Dropout is a LoRA variant itself and PEFT runs one variant per layer: it would replace that variant's "
        "forward and merge and silently train a different model, so it is refused; LoRA Dropout works on plain LoRA "
        "adapters (see docs/COVERAGE.md)"
    )


# ------------------------------------------------------------------------------------------------ layer handlers
class LayerHandler:
    """How loradrop attaches to one kind of PEFT layer. Register new kinds with `register_layer_handler`.

    A handler says which layers it adapts, their mask dimensions, how to install LoRA Dropout on one layer
    instance (`install`/`uninstall`, without closures so deep copies stay independent) and which tensors hold B
    (an export folds the expected factor into them).
    """

    peft_types: tuple[str, ...] = ()

    def matches(self, module: nn.Module, adapter: str) -> bool:
        raise NotImplementedError

    def dims(self, module: nn.Module, adapter: str) -> tuple[int, int, int]:
        """(in_features, out_features, rank) of the adapter's update."""
        raise NotImplementedError

    def install(self, module: nn.Module, adapter: str, controller: MemberController, slices: FeatureSlices) -> None:
        raise NotImplementedError

    def uninstall(self, module: nn.Module, adapter: str, controller: MemberController) -> None:
        """Remove what `install` added. Must not rely on closures: models are deep-copied (exports, Trainer)."""
        raise NotImplementedError

    def b_tensors(self, module: nn.Module, adapter: str) -> list[torch.Tensor]:
        """The weights of B (an export multiplies them by the expected factor)."""
        raise NotImplementedError

    def b_bias(self, module: nn.Module, adapter: str) -> torch.Tensor | None:
        """B's bias (PEFT ``lora_bias``), whose expected factor differs (`LoraDropoutConfig.expected_bias_factor`);
        None (the default) when the layer has none."""
        return None

    def precompute_weights(self, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) parameters whose masked copies the model pre-hook may build for all layers at once, with the
        layer's ``scaling`` folded in; None (the default) lets the layer mask its own weights."""
        return None

    def check(self, name: str, module: nn.Module, adapter: str) -> None:
        """Raise ValueError if this layer cannot take LoRA Dropout (called before anything is changed)."""


class VariantHandler(LayerHandler):
    """A handler that installs LoRA Dropout as PEFT's per-instance `LoraVariant` (``module.lora_variant``), the
    extension point PEFT calls from its own forward, merge and unmerge; `variant_class` is the variant it installs.
    Layers whose adapter already has another variant (DoRA, ...) are refused by `check`."""

    variant_class: type[LoraDropoutVariant] = LoraDropoutVariant

    def check(self, name: str, module: nn.Module, adapter: str) -> None:
        refuse_variant(name, module, adapter)

    def install(self, module: nn.Module, adapter: str, controller: MemberController, slices: FeatureSlices) -> None:
        module.lora_variant[adapter] = self.variant_class(controller, slices)

    def uninstall(self, module: nn.Module, adapter: str, controller: MemberController) -> None:
        variant = module.lora_variant.get(adapter)
        if isinstance(variant, self.variant_class) and variant.controller is controller:
            del module.lora_variant[adapter]


class LoraLinearHandler(VariantHandler):
    """`peft.tuners.lora.Linear`, through PEFT's `LoraVariant` extension point."""

    peft_types = ("LORA",)

    def matches(self, module: nn.Module, adapter: str) -> bool:
        from peft.tuners.lora.layer import Linear

        # Quantised subclasses (bnb, gptq...) override forward and never call variants: leave them alone.
        return isinstance(module, Linear) and type(module).forward is Linear.forward and adapter in module.lora_A

    def dims(self, module: nn.Module, adapter: str) -> tuple[int, int, int]:
        r, in_features = module.lora_A[adapter].weight.shape
        return in_features, module.lora_B[adapter].weight.shape[0], r

    def b_tensors(self, module: nn.Module, adapter: str) -> list[torch.Tensor]:
        return [module.lora_B[adapter].weight]

    def b_bias(self, module: nn.Module, adapter: str) -> torch.Tensor | None:
        return module.lora_B[adapter].bias

    def precompute_weights(self, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if module.lora_B[adapter].bias is not None:  # lora_bias: the bias needs the mask too; keep it per layer
            return None
        return module.lora_A[adapter].weight, module.lora_B[adapter].weight


LAYER_HANDLERS: list[LayerHandler] = [LoraLinearHandler()]


def register_layer_handler(handler: LayerHandler) -> None:
    """Teach loradrop a new kind of PEFT layer (checked before the built-in ones)."""
    LAYER_HANDLERS.insert(0, handler)


def handler_for(module: nn.Module, adapter: str) -> LayerHandler | None:
    for handler in LAYER_HANDLERS:
        if handler.matches(module, adapter):
            return handler
    return None
