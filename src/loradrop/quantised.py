"""LoRA Dropout on PEFT's LoRA layers over quantised bases: bitsandbytes 4-bit (QLoRA) and 8-bit.

PEFT's ``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt`` have their own forward, but for an adapter that has a
`LoraVariant` it calls the variant exactly where ``lora.Linear`` does, after the quantised base layer ran once:

    result = base_layer(x)                       # the quantised matmul, once per call (4-bit: then result.clone())
    x = x.to(lora_A.weight.dtype)                # unless autocast is on
    result = variant.forward(layer, adapter, x, result)
    result = result.to(result's dtype before)    # unless autocast is on

and its merge / unmerge call the variant's ``merge_safe`` / ``unmerge`` on the dequantised weight. So LoRA Dropout
runs on them with the ``lora.Linear`` machinery as it is (`layers.LoraDropoutVariant`): the masks act on the small
A (r x in) and B (out x r) in the adapter's dtype (float32 after ``prepare_model_for_kbit_training``), members run as
two batched matmuls, and the all-layer precompute of masked weights applies. Two things differ from ``lora.Linear``
and are reproduced here, so that p = 0 is bit for bit plain PEFT QLoRA:

- without (CUDA) autocast, PEFT's vanilla bnb path casts the LoRA output to the base output's dtype (bfloat16 / float16
  compute dtype) and *then* adds it; ``lora.Linear`` adds first and casts after. The variant computes the update
  alone, casts it, and adds.
- PEFT's vanilla merge adds the delta to the dequantised weight with type promotion (4-bit) or after casting the
  weight to the delta's dtype (8-bit), then re-quantises; the variant merges the same way (with the expected
  factor, as every LoRA Dropout merge).

Other variants on these layers (DoRA, aLoRA, Arrow) are refused by `layers.refuse_variant`. The other quantised
backends (GPTQ, AWQ, HQQ, torchao, ...) stay refused: they are not installed here to be tested
(`layer_types.unsupported_reason`).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LoraDropoutVariant, LoraLinearHandler, register_layer_handler

BNB_MODULE = "peft.tuners.lora.bnb"
BNB_CLASSES = ("Linear4bit", "Linear8bitLt")


class LoraDropoutBnbVariant(LoraDropoutVariant):
    """`LoraDropoutVariant` for one adapter of a PEFT bitsandbytes LoRA layer (``lora.bnb.Linear4bit`` /
    ``Linear8bitLt``): the same masks and members, PEFT's bnb order of cast and add, PEFT's bnb merge arithmetic."""

    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        # PEFT's test, as PEFT writes it (no device argument: CUDA autocast): under autocast it adds as it is
        if result.dtype == module.lora_A[active_adapter].weight.dtype or torch.is_autocast_enabled():
            return self.add_update(module, active_adapter, x, result)  # one dtype: PEFT adds as lora.Linear does
        return result + self.add_update(module, active_adapter, x, None).to(result.dtype)

    @staticmethod
    def _combine(module: nn.Module, weight: torch.Tensor, delta: torch.Tensor, sign: int) -> torch.Tensor:
        # PEFT's vanilla bnb merge: 8-bit casts the dequantised weight to the delta's dtype first, 4-bit promotes
        if type(module).__name__ == "Linear8bitLt":
            weight = weight.to(delta.dtype).to(delta.device)
        return weight + delta if sign > 0 else weight - delta

    def merge_safe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        factor, bias_factor = self.controller.expected_factor, self.controller.expected_bias_factor
        self._merged_factor[active_adapter] = (factor, bias_factor)
        merged = self._combine(module, orig_weight, self._delta_weight(module, active_adapter, factor), 1)
        if module.lora_B[active_adapter].bias is not None and bool(torch.isfinite(merged).all()):
            self._shift_base_bias(module, active_adapter, bias_factor - 1.0)  # PEFT then adds lora_B.bias in full
        return merged

    def merge_unsafe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        raise NotImplementedError("PEFT's bitsandbytes layers merge through merge_safe only")

    def unmerge(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        factor, bias_factor = self._merged_factor.pop(
            active_adapter, (self.controller.expected_factor, self.controller.expected_bias_factor))
        self._shift_base_bias(module, active_adapter, 1.0 - bias_factor)
        return self._combine(module, orig_weight, self._delta_weight(module, active_adapter, factor), -1)


class LoraBnbHandler(LoraLinearHandler):
    """PEFT's ``lora.bnb.Linear4bit`` (QLoRA) and ``lora.bnb.Linear8bitLt``: the ``lora.Linear`` features (columns
    of A, rows of B), dims, precompute and export; `LoraDropoutBnbVariant` as the variant. Matched by class name and
    module, so importing loradrop never imports bitsandbytes."""

    variant_class = LoraDropoutBnbVariant

    def matches(self, module: nn.Module, adapter: str) -> bool:
        cls = type(module)
        return cls.__module__ == BNB_MODULE and cls.__name__ in BNB_CLASSES and adapter in module.lora_A


register_layer_handler(LoraBnbHandler())
