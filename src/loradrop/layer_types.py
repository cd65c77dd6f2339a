"""LoRA Dropout on PEFT LoRA layer types beyond `lora.Linear`, and the precise refusal of the others.

Supported here: `peft.tuners.lora.Embedding` (`LoraEmbeddingHandler`) and `peft.tuners.lora` Conv1d / Conv2d /
Conv3d (`LoraConvHandler`: input and output channels, the base layer's groups kept). `lora.Linear` over
transformers' GPT-2 ``Conv1D`` (``fan_in_fan_out=True``) is handled by `layers.LoraLinearHandler` as it is: PEFT's
LoRA factors of that layer are ordinary ``nn.Linear`` A (r x in) and B (out x r); ``fan_in_fan_out`` only transposes
the merged delta.

Embedding semantics (docs/COVERAGE.md). PEFT stores A = ``lora_embedding_A`` (r x V) and B = ``lora_embedding_B``
(D x r) and adds ``s * B A onehot(token)``. An embedding is a linear map of the one-hot token, so:

- an *input feature* is a vocabulary entry (a column of A): dropping it zeroes the LoRA update of that token (in
  every position where it occurs) for that member;
- an *output feature* is an embedding dimension (a row of B);
- ``"rank"`` drops rank components, as for Linear;
- ``"input"`` (element-wise inverted dropout of the LoRA input) drops the one non-zero element of a position's one-hot
  input, i.e. each position's LoRA update independently with probability p, scaled by 1/(1-p) when kept.

The masked update is computed without a per-member copy of the (V x r) table: ``embed(x, A^T)`` gathers the
token rows and they are multiplied by the gathered keep value of their token, which is exactly
``embed(x, (A * keep)^T)``. The layer masks its own weights (it does not join the all-layer precompute). PEFT's
``embed_scale`` (Gemma-style scaled embeddings) is applied as PEFT does.

Everything else is refused by `unsupported_reason` with the type and the reason, before anything is changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Embedding, _ConvNd
from torch import nn

from .layers import (
    LoraDropoutVariant,
    VariantHandler,
    input_dropout,
    members_of,
    register_layer_handler,
)
from .masks import STREAM_INPUT, derive_key, fold_key, uniform
from .members import MemberController


class LoraDropoutEmbeddingVariant(LoraDropoutVariant):
    """`LoraDropoutVariant` for one adapter of one `peft.tuners.lora.Embedding` layer."""

    @staticmethod
    def _shift_base_bias(module: nn.Module, adapter: str, amount: float) -> None:
        return None  # an embedding's LoRA has no bias

    def merge_safe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + self._merge(module, active_adapter, orig_weight)

    def merge_unsafe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += self._merge(module, active_adapter, orig_weight)

    def unmerge(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        factor, _ = self._merged_factor.pop(active_adapter, (self.controller.expected_factor, 1.0))
        return orig_weight - self._delta_weight(module, active_adapter, factor).to(orig_weight.dtype)

    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        weight_a = module.lora_embedding_A[active_adapter]  # (r, V)
        weight_b = module.lora_embedding_B[active_adapter]  # (D, r)
        scaling = module.scaling[active_adapter]
        embed_scale = module._get_embed_scale()
        input_fn = module.input_fns.get(active_adapter, None)
        output_fn = module.output_fns.get(active_adapter, None)
        after_a = module._embed(x, weight_a.T, input_fn=input_fn, output_fn=output_fn)  # (..., r)
        controller = self.controller
        plan = controller.plan_for(module.training)
        if not plan.masked or controller.config.p == 0:  # PEFT's exact ops (p = 0: bit for bit)
            factor = controller.expected_factor
            out = (after_a @ weight_b.T) * (scaling if factor == 1.0 else scaling * factor)
        else:
            out = self._masked(x, after_a, weight_b, scaling, plan, controller)
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        return result + out

    def _masked(self, x: torch.Tensor, after_a: torch.Tensor, weight_b: torch.Tensor, scaling: float, plan,
                controller: MemberController) -> torch.Tensor:
        members = members_of(plan, x)
        slices, cfg = self.slices, controller.config
        rank = after_a.shape[-1]
        h = after_a.reshape(members, -1, rank)  # (M, positions, r), member-major
        ids = x.reshape(members, -1)
        if cfg.strategy == "input":  # each position's one-hot element: dropped with probability p, inverted scale
            if plan.input_key is not None and plan.input_key.device == x.device:
                key = fold_key(plan.input_key, slices.layer_index)
            else:
                key = derive_key(plan.key, STREAM_INPUT, slices.layer_index)
            member_ids = controller.index(members, x.device, offset=plan.member_offset)
            keep = uniform(key, member_ids, controller.index(ids.shape[1], x.device)) >= cfg.p
            h = torch.where(keep[..., None], h * cfg.keep_scale, 0.0)
            out = h @ weight_b.T
        else:
            mask = controller.masks(plan, members, weight_b.device, weight_b.dtype)
            if slices.a is not None:  # columns of A = vocabulary entries: the keep value of each position's token
                h = h * torch.gather(mask[:, slices.a[0]:slices.a[1]], 1, ids)[..., None]
            if slices.rank is not None:
                h = h * mask[:, None, slices.rank[0]:slices.rank[1]]
            if slices.b is not None:  # rows of B = embedding dimensions
                b = weight_b * mask[:, slices.b[0]:slices.b[1], None]  # (M, D, r)
                out = torch.bmm(h, b.transpose(1, 2))
            else:
                out = h @ weight_b.T
        return (out * scaling).view(*x.shape, weight_b.shape[0])


class LoraEmbeddingHandler(VariantHandler):
    """`peft.tuners.lora.Embedding`: vocabulary entries (columns of A) and embedding dimensions (rows of B)."""

    peft_types = ("LORA",)
    variant_class = LoraDropoutEmbeddingVariant

    def matches(self, module: nn.Module, adapter: str) -> bool:
        return (isinstance(module, Embedding) and type(module).forward is Embedding.forward
                and adapter in module.lora_embedding_A)

    def dims(self, module: nn.Module, adapter: str) -> tuple[int, int, int]:
        r, vocab = module.lora_embedding_A[adapter].shape
        return vocab, module.lora_embedding_B[adapter].shape[0], r

    def b_tensors(self, module: nn.Module, adapter: str) -> list[torch.Tensor]:
        return [module.lora_embedding_B[adapter]]


register_layer_handler(LoraEmbeddingHandler())


class LoraDropoutConvVariant(LoraDropoutVariant):
    """`LoraDropoutVariant` for one adapter of a `peft.tuners.lora` Conv1d / Conv2d / Conv3d layer.

    PEFT's conv LoRA is A = conv(in -> r, the base kernel, stride, padding) and B = conv(r -> out, 1x1, the base's
    groups). Input features are input channels (dim 1 of A's weight), output features output channels (dim 0 of B's
    weight), "rank" drops A's output channels. The members run in ONE conv per factor: the member-major batch is
    laid side by side along channels and the members' masked weights are stacked, with ``groups = M`` for A and
    ``groups = M * base groups`` for B, so B's own groups are kept inside every member.
    """

    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        controller = self.controller
        plan = controller.plan_for(module.training)
        if not plan.masked or controller.config.p == 0:  # PEFT's exact ops (p = 0: bit for bit)
            factor = controller.expected_factor
            return result + lora_b(lora_a(dropout(x))) * (scaling if factor == 1.0 else scaling * factor)
        x = dropout(x)
        members = members_of(plan, x)
        if controller.config.strategy == "input":
            return result + lora_b(lora_a(input_dropout(x, plan, controller, self.slices, members))) * scaling
        wa, wb, sl = lora_a.weight, lora_b.weight, self.slices
        mask = controller.masks(plan, members, wb.device, wb.dtype)
        ones = (1,) * (wa.dim() - 2)
        a_m = wa.expand(members, *wa.shape)
        if sl.a is not None:
            a_m = a_m * mask[:, sl.a[0]:sl.a[1]].view(members, 1, -1, *ones)  # input channels
        if sl.rank is not None:
            a_m = a_m * mask[:, sl.rank[0]:sl.rank[1]].view(members, -1, 1, *ones)
        b_m = wb.expand(members, *wb.shape)
        if sl.b is not None:
            b_m = b_m * mask[:, sl.b[0]:sl.b[1]].view(members, -1, 1, *ones)  # output channels
        conv = _CONV[wa.dim()]
        rows = x.shape[0] // members
        side_by_side = x.reshape(members, rows, *x.shape[1:]).transpose(0, 1).reshape(rows, -1, *x.shape[2:])
        h = conv(side_by_side, a_m.reshape(-1, *wa.shape[1:]), None, lora_a.stride, lora_a.padding, lora_a.dilation,
                 members)
        out = conv(h, b_m.reshape(-1, *wb.shape[1:]), None, lora_b.stride, lora_b.padding, lora_b.dilation,
                   members * lora_b.groups)
        out = out.view(rows, members, -1, *out.shape[2:]).transpose(0, 1).reshape(result.shape)
        return result + out * scaling


_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


class LoraConvHandler(VariantHandler):
    """`peft.tuners.lora` Conv1d / Conv2d / Conv3d: input channels (A) and output channels (B)."""

    peft_types = ("LORA",)
    variant_class = LoraDropoutConvVariant

    def matches(self, module: nn.Module, adapter: str) -> bool:
        return (isinstance(module, _ConvNd) and type(module).forward is _ConvNd.forward and adapter in module.lora_A
                and module.lora_A[adapter].weight.dim() in _CONV)

    def dims(self, module: nn.Module, adapter: str) -> tuple[int, int, int]:
        weight_a = module.lora_A[adapter].weight
        return weight_a.shape[1], module.lora_B[adapter].weight.shape[0], weight_a.shape[0]

    def check(self, name: str, module: nn.Module, adapter: str) -> None:
        super().check(name, module, adapter)
        if module.lora_B[adapter].bias is not None:
            raise ValueError(f"layer {name!r} is a LoRA convolution with lora_bias=True: LoRA Dropout's bias "
                             "expectation is written for Linear layers only; use lora_bias=False")
        if module.lora_A[adapter].padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: LoRA convolutions with padding_mode "
                             f"{module.lora_A[adapter].padding_mode!r} are not supported (zeros only)")

    def b_tensors(self, module: nn.Module, adapter: str) -> list[torch.Tensor]:
        return [module.lora_B[adapter].weight]


register_layer_handler(LoraConvHandler())


# ------------------------------------------------------------------------------------------------ refusals
_REASONS = {  # why these are refused, in full: docs/COVERAGE.md
    "MultiheadAttention": (
        "PEFT's lora.MultiheadAttention has no A/B matmul to mask: every forward merges s*B@A into in_proj_weight and "
        "out_proj.weight and runs nn.MultiheadAttention on the merged weights. Per-member masks would need one merged "
        "weight set and one attention call per member, with key/value/attn_mask/key_padding_mask split per member "
        "along a batch dimension that is dim 1 unless batch_first=True; loradrop does not do this, so it is refused"),
    "ParamWrapper": (
        "target_parameters (e.g. MoE expert weights) add the update through a parametrization of the wrapped "
        "nn.Parameter, read by the wrapped module's own forward (e.g. an experts block with its routing "
        "arguments): one weight for the whole call, so members (samples > 1, per-example masks, ensembles) would "
        "each need their own forward of that module on their own rows and arguments; loradrop does not split a "
        "foreign module's arguments, so it is refused"),
}
_QUANTISED = ("bnb", "gptq", "awq", "aqlm", "eetq", "hqq", "torchao", "inc", "tp_layer", "te")


def unsupported_reason(module: nn.Module) -> str:
    """Why loradrop refuses this LoRA layer (no handler matched it): its type and the reason, in one phrase."""
    cls = type(module)
    kind = f"{cls.__module__}.{cls.__qualname__}"
    origin = cls.__module__.rsplit(".", 1)[-1]
    if cls.__module__.startswith("peft.tuners.lora.") and origin in _QUANTISED:
        return (f"{kind} is a quantised / backend-specific LoRA layer that loradrop has no handler for: its own "
                "forward is not known to call PEFT's LoRA variants, and the backend is not installed here to test it "
                "(bitsandbytes 4-bit / 8-bit QLoRA layers are supported; docs/COVERAGE.md)")
    reason = _REASONS.get(cls.__name__)
    if reason is not None and cls.__module__ == "peft.tuners.lora.layer":
        return f"{kind}: {reason}"
    if cls.__module__ == "peft.tuners.lora.layer":
        return (f"{kind} subclasses a PEFT LoRA layer with its own forward, which may not call PEFT's LoRA variants; "
                "register a handler with loradrop.register_layer_handler")
    return f"{kind} has no loradrop layer handler (register one with loradrop.register_layer_handler)"
