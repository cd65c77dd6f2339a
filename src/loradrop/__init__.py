"""loradrop: LoRA Dropout (Lin et al., arXiv 2404.09610) for PEFT models: a sparsity regulariser for LoRA
fine-tuning, batched multi-mask training and calibrated test-time ensembles."""

from .config import MASK_SCOPES, STRATEGIES, LoraDropoutConfig
from .members import split_members
from .model import (
    apply_lora_dropout,
    export_adapter,
    from_pretrained,
    get_controller,
    get_mask_state,
    remove_lora_dropout,
    set_eval_mode,
    set_mask_state,
)

__version__ = "0.1.0"

__all__ = [
    "MASK_SCOPES",
    "STRATEGIES",
    "LoraDropoutConfig",
    "apply_lora_dropout",
    "export_adapter",
    "from_pretrained",
    "get_controller",
    "get_mask_state",
    "remove_lora_dropout",
    "set_eval_mode",
    "set_mask_state",
    "split_members",
]

from .ensemble import (  # noqa: E402
    ChoiceOutput,
    EnsembleOutput,
    GenerationOutput,
    ensemble_generate,
    ensemble_predict,
    ensemble_score_choices,
)

__all__ += [
    "ChoiceOutput",
    "EnsembleOutput",
    "GenerationOutput",
    "ensemble_generate",
    "ensemble_predict",
    "ensemble_score_choices",
]

from .adalora import AdaLoraCallback, adalora_step, effective_ranks  # noqa: E402

__all__ += ["AdaLoraCallback", "adalora_step", "effective_ranks"]

_TRAINING = ("chunked_backward", "LoraDropoutTrainer", "LoraDropoutCallback")
__all__ += list(_TRAINING)


def __getattr__(name: str):
    # The Trainer integration imports transformers' Trainer (slow): load it on first use.
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'loradrop' has no attribute {name!r}")
