"""loradrop: LoRA Dropout (Lin et al., arXiv 2404.09610) for PEFT models: a sparsity regulariser for LoRA
fine-tuning, batched multi-mask training and calibrated test-time ensembles.

Every public name is loaded on first use (PEP 562), so ``import loradrop`` (and the command line's ``--help``)
does not import torch, transformers or PEFT until something needs them."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("MASK_SCOPES", "STRATEGIES", "LoraDropoutConfig"), "config"),
    "split_members": "members",
    **dict.fromkeys(("apply_lora_dropout", "export_adapter", "from_pretrained", "get_controller", "get_mask_state",
                     "remove_lora_dropout", "set_eval_mode", "set_mask_state"), "model"),
    **dict.fromkeys(("ChoiceOutput", "EnsembleOutput", "cuda_memory_budget", "ensemble_predict",
                     "ensemble_score_choices"), "ensemble"),
    "ensemble_generate": "generation",
    "GenerationOutput": "uncertainty",
    **dict.fromkeys(("AdaLoraCallback", "adalora_step", "effective_ranks"), "adalora"),
    **dict.fromkeys(("chunked_backward", "LoraDropoutTrainer", "LoraDropoutCallback"), "training"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule, e.g. ``loradrop.model``
    raise AttributeError(f"module 'loradrop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
