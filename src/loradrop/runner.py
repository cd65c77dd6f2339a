"""``loradrop train`` and ``loradrop eval``: fine-tune a task with LoRA (or AdaLoRA) plus LoRA Dropout on the
transformers ``Trainer``, then evaluate the single pass and the test-time ensemble.

A run folder holds ``metrics.json`` (config, versions, data metadata, wall times, ``eval.single`` and
``eval.ensemble``), ``adapter/`` (standard PEFT files plus ``loradrop_config.json``), ``predictions.jsonl``,
``loss_history.json``, ``train.log``, ``run_config.json`` and the ``checkpoint-N`` folders of ``--save-steps``.

A fresh run is built in a hidden staging folder next to the output (``.NAME.partial``) and renamed into place at
the end, so a failed run leaves no partial output folder. A run interrupted after a checkpoint keeps its staging
folder, and ``--resume`` continues it (or continues a finished run folder in place) from its last complete
checkpoint. Under ``torchrun`` the Trainer trains with DDP and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import UsageError
from .config import CONFIG_FILE_NAME, LoraDropoutConfig, write_json_atomic

logger = logging.getLogger("loradrop.runner")

METRICS_FILE = "metrics.json"
EVAL_METRICS_FILE = "eval_metrics.json"
RUN_CONFIG_FILE = "run_config.json"
ADAPTER_DIR = "adapter"
LOG_FILE = "train.log"
MMLU_SHOTS = (0, 5)
MMLU_MAX_LEN = 2048
# Settings that must not change between a run and its --resume (the result would no longer be one run).
RESUME_KEYS = ("task", "model", "data_dir", "method", "r", "alpha", "target_modules", "no_lora_dropout", "p",
               "samples", "strategy", "mask_scope", "rescale", "epochs", "max_steps", "lr", "batch_size",
               "max_seq_len", "max_train_samples", "seed")
_PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "span": "QUESTION_ANS",
                    "causal_lm": "CAUSAL_LM"}


# ================================================================================================ small helpers
def versions() -> dict[str, str]:
    """Versions of python, torch, transformers, peft, datasets and loradrop."""
    import datasets
    import peft
    import transformers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "datasets": datasets.__version__, "loradrop": __version__}


def jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of `value` (sets become sorted lists, paths and enums strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "value") and isinstance(value.value, (str, int)):  # enums
        return value.value
    return str(value)


def _floats(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    probs = probs.double()
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(jsonable(row), sort_keys=True) + "\n")
    os.replace(tmp, path)


def _replace_dir(source: Path, target: Path) -> None:
    """Move `source` onto `target`, replacing a previous `target`."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(source, target)


def _checkpoints(folder: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders (the Trainer renames them into place atomically), by step."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def _is_main(training_args: Any) -> bool:
    return int(getattr(training_args, "process_index", 0)) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def _run_log(path: Path | None) -> Iterator[None]:
    """Copy the transformers and loradrop loggers (INFO and up) into `path` without flooding the console."""
    if path is None:
        yield
        return
    from transformers.utils import logging as hf_logging

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    hf_root = hf_logging.get_logger("transformers")
    ours = logging.getLogger("loradrop")
    saved = (hf_root.level, ours.level, [(h, h.level) for h in hf_root.handlers])
    console_level = hf_logging.get_verbosity()
    for h in hf_root.handlers:  # the console keeps transformers' own verbosity
        h.setLevel(max(h.level, console_level))
    hf_root.setLevel(logging.INFO)
    ours.setLevel(logging.INFO)
    hf_root.addHandler(handler)
    ours.addHandler(handler)
    try:
        yield
    finally:
        hf_root.removeHandler(handler)
        ours.removeHandler(handler)
        handler.close()
        hf_root.setLevel(saved[0])
        ours.setLevel(saved[1])
        for h, level in saved[2]:
            h.setLevel(level)


# ================================================================================================ tasks and models
def registry_task(cli_task: str, data_dir: str | None) -> str:
    """The registry name of a CLI task: ``instruct`` trains on Alpaca (``lima`` when data_dir is a LIMA file)."""
    if cli_task != "instruct":
        return cli_task
    if data_dir is not None and Path(data_dir).is_file() and Path(data_dir).name.lower().startswith("lima"):
        return "lima"
    return "alpaca"


def default_model(kind: str) -> str:
    """The offline default model of a task kind."""
    from .models import OFFLINE_DECODER, OFFLINE_ENCODER

    return OFFLINE_DECODER if kind == "causal_lm" else OFFLINE_ENCODER


def model_id(name: str) -> str:
    """What to record for reloading: an absolute path for a local folder, else the alias / hub id."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def check_model_fits(name: str, kind: str) -> Any:
    """Read the model's config and reject architectures that cannot do `kind`; returns the config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    from .models import ModelLoadError, resolve

    try:
        config = AutoConfig.from_pretrained(**resolve(name))
    except (OSError, ValueError) as err:
        from .models import _hub_error

        raise _hub_error(name, err) if isinstance(err, OSError) else ModelLoadError(
            f"could not read the config of model {name!r}: {err}") from err
    model_type = getattr(config, "model_type", None)
    if kind == "causal_lm":
        fits = (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
                and not getattr(config, "is_encoder_decoder", False))
        need = "a decoder-only causal LM (e.g. --model smollm2)"
    elif kind == "span":
        fits = model_type in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES
        need = "a model with an extractive question-answering head (e.g. --model minilm)"
    else:
        fits = model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        need = "a model with a sequence-classification head (e.g. --model minilm)"
    if not fits:
        raise UsageError(f"model {name!r} (model_type {model_type!r}) does not fit a {kind} task: it needs {need}")
    return config


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """``query,value`` for BERT-like models, ``q_proj,v_proj`` for Llama-like ones."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for pair in (["query", "value"], ["q_proj", "v_proj"]):
        if set(pair) <= names:
            return pair
    raise UsageError(f"cannot choose default LoRA target modules for {type(model).__name__}; pass --target-modules "
                     "(comma-separated names of its attention projections)")


def _ddp_options(world_size: int) -> dict[str, Any] | None:
    """TrainingArguments for several processes: gloo on CPU; every trainable parameter is used in each step."""
    if world_size <= 1:
        return None
    options: dict[str, Any] = {"ddp_find_unused_parameters": False}
    if not torch.cuda.is_available():
        options["ddp_backend"] = "gloo"
    return options


def _leave_process_group() -> None:
    """After training under torchrun: synchronise once, then close the process group on every rank, so that
    replicas exit cleanly while rank 0 evaluates and writes alone (no collective call is left to wait on)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


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


def _train_steps(n_rows: int, args: argparse.Namespace, world_size: int) -> int:
    """Optimizer steps the Trainer will run (its own formula)."""
    if args.max_steps > 0:
        return int(args.max_steps)
    per_epoch = max(1, math.ceil(n_rows / (args.batch_size * world_size)))
    return max(1, math.ceil(args.epochs * per_epoch))


def build_peft_config(args: argparse.Namespace, kind: str, target_modules: list[str], total_steps: int) -> Any:
    """LoraConfig (lora_dropout=0: LoRA Dropout replaces it), or AdaLoraConfig with a schedule for the run."""
    from peft import AdaLoraConfig, LoraConfig

    common = dict(lora_alpha=args.alpha, target_modules=target_modules, lora_dropout=0.0,
                  task_type=_PEFT_TASK_TYPES[kind])
    if args.method == "adalora":
        from .adalora import adalora_schedule

        return AdaLoraConfig(**adalora_schedule(total_steps, target_r=args.r), **common)
    return LoraConfig(r=args.r, **common)


def lora_dropout_config(args: argparse.Namespace) -> LoraDropoutConfig | None:
    """The LoRA Dropout settings of the flags, or ``None`` with ``--no-lora-dropout``."""
    if args.no_lora_dropout:
        return None
    return LoraDropoutConfig(p=args.p, samples=args.samples, strategy=args.strategy, mask_scope=args.mask_scope,
                             rescale=args.rescale, seed=args.seed,
                             member_chunk=args.chunk_size if args.mask_scope == "batch" else None)


# ================================================================================================ data
@dataclass
class TaskData:
    """Everything a run needs from the data side."""

    spec: Any
    raw: Any  # DatasetDict as loaded (subsampled)
    train: Any  # tokenized train set
    eval_loss: Any  # tokenized set for the Trainer's eval loss (or None)
    eval_split: str  # split of `raw` the final metrics are computed on
    collator: Any
    metadata: dict[str, Any]
    extras: dict[str, Any]


def load_data(cli_task: str, args: argparse.Namespace, tokenizer: Any, *, max_seq_len: int, seed: int,
              max_train_samples: int | None, max_eval_samples: int | None, need_train: bool = True) -> TaskData:
    """Load, check and tokenize a task (and, for ``instruct``, locate MMLU)."""
    from datasets import DatasetDict
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, default_data_collator

    from .tasks import get_metadata, get_task, load_task_data, preprocess

    spec = get_task(registry_task(cli_task, args.data_dir))
    raw = load_task_data(spec, args.data_dir, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                         seed=seed)
    metadata = get_metadata(raw)
    eval_split = "test" if "test" in raw and spec.kind in ("classification", "regression") else "validation"
    extras: dict[str, Any] = {}
    if spec.kind == "span":
        doc_stride = min(128, max_seq_len // 3)
        extras["doc_stride"] = doc_stride
        train = preprocess(spec, DatasetDict({"train": raw["train"]}), tokenizer, max_seq_len,
                           doc_stride=doc_stride)["train"] if need_train else None
        # eval loss needs answer positions: the validation questions in the train-feature layout
        eval_loss = preprocess(spec, DatasetDict({"train": raw["validation"]}), tokenizer, max_seq_len,
                               doc_stride=doc_stride)["train"] if need_train else None
        extras["eval_features"] = preprocess(spec, DatasetDict({"validation": raw["validation"]}), tokenizer,
                                             max_seq_len, doc_stride=doc_stride)["validation"]
        collator = default_data_collator
    elif spec.kind == "causal_lm":
        splits = ("train", "validation") if need_train else ("validation",)
        encoded = preprocess(spec, DatasetDict({k: raw[k] for k in splits}), tokenizer, max_seq_len)
        train, eval_loss = encoded["train"] if need_train else None, encoded["validation"]
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        extras.update(_load_mmlu_eval(args.data_dir, max_eval_samples, seed, metadata))
    else:
        splits = [*(["train", "validation"] if need_train else []), eval_split]
        encoded = preprocess(spec, DatasetDict({k: raw[k] for k in dict.fromkeys(splits)}), tokenizer, max_seq_len)
        train = encoded["train"] if need_train else None
        eval_loss = encoded["validation"] if need_train else None
        extras["eval_encoded"] = encoded[eval_split]
        collator = DataCollatorWithPadding(tokenizer)
    for name, dataset in (("train", train), ("validation", eval_loss)):
        if dataset is not None and len(dataset) == 0:
            raise UsageError(f"{spec.name}: the {name} split is empty after tokenization (max_seq_len {max_seq_len}"
                             " too small?)")
    return TaskData(spec=spec, raw=raw, train=train, eval_loss=eval_loss, eval_split=eval_split, collator=collator,
                    metadata=metadata, extras=extras)


def _load_mmlu_eval(data_dir: str | None, max_eval_samples: int | None, seed: int,
                    metadata: dict[str, Any]) -> dict[str, Any]:
    """MMLU test questions (the same subsample for every shot count), for the instruct evaluation."""
    from .tasks import find_data_root, load_mmlu
    from .tasks.base import subsample
    from .tasks.instruct import find_mmlu_dir

    candidates = [Path(data_dir)] if data_dir is not None and Path(data_dir).is_dir() else []
    root = find_data_root()
    if root is not None:
        candidates.append(root)
    folder = None
    for candidate in candidates:
        try:
            folder = find_mmlu_dir(candidate)
            break
        except ValueError:
            continue
    if folder is None:
        raise UsageError(f"instruct: MMLU evaluation data (mmlu/data/{{dev,test}}/*.csv) not found in "
                         f"{[str(c) for c in candidates]}; put it under --data-dir or set LORADROP_DATA_DIR")
    sets = {}
    for shots in MMLU_SHOTS:
        full = load_mmlu(folder, "test", k_shot=shots)
        sets[shots] = subsample(full, max_eval_samples, seed, "max_eval_samples")
    metadata["mmlu"] = {"source": str(folder), "split": "test", "k_shot": list(MMLU_SHOTS),
                        "questions": len(sets[0]), "questions_before_subsampling": len(full),
                        "subjects": len(set(sets[0]["subject"])), "seed": seed,
                        "shots_from": "the first k rows of each subject's dev CSV"}
    return {"mmlu": sets}


# ================================================================================================ evaluation
@dataclass
class EvalResult:
    """Metrics of the single pass and the ensemble, and one prediction row per example."""

    single: dict[str, Any]
    ensemble: dict[str, Any] | None
    rows: list[dict[str, Any]]


def evaluate(model: torch.nn.Module, data: TaskData, tokenizer: Any, *, batch_size: int, ensemble: int,
             chunk_size: int | None, seed: int, max_seq_len: int) -> EvalResult:
    """Single-pass and ensemble metrics for the task's kind."""
    kind = data.spec.kind
    if kind == "span":
        return _evaluate_span(model, data, batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size, seed=seed)
    if kind == "causal_lm":
        return _evaluate_mmlu(model, data, tokenizer, batch_size=batch_size, ensemble=ensemble,
                              chunk_size=chunk_size, seed=seed)
    return _evaluate_classification(model, data, batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size,
                                    seed=seed)


def _evaluate_classification(model: torch.nn.Module, data: TaskData, *, batch_size: int, ensemble: int,
                             chunk_size: int | None, seed: int) -> EvalResult:
    from .calibration import classification_calibration
    from .tasks import compute_metrics
    from .training import predict_classification

    spec = data.spec
    regression = spec.kind == "regression"
    preds = predict_classification(model, data.extras["eval_encoded"], data.collator, batch_size=batch_size,
                                   ensemble=ensemble, chunk_size=chunk_size, seed=seed, regression=regression)
    labels = preds.labels
    raw = data.raw[data.eval_split]
    ids = list(raw["idx"]) if "idx" in raw.column_names else list(range(len(raw)))

    def metrics(values: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = dict(compute_metrics(spec, values.numpy(), labels.numpy()))
        if not regression:
            calibration = classification_calibration(values, labels)
            out.update({k: calibration[k] for k in ("ece", "nll", "brier")})
        out["n"] = len(labels)
        return out

    single = metrics(preds.single)
    ens = None
    if preds.ensemble is not None:
        ens = {**metrics(preds.ensemble), "ensemble_size": ensemble}
    rows = []
    for i in range(len(labels)):
        row: dict[str, Any] = {"index": i, "id": ids[i]}
        if regression:
            row.update(label=float(labels[i]), single=float(preds.single[i]))
            if ens is not None:
                row.update(ensemble_mean=float(preds.ensemble[i]),
                           uncertainty={"ensemble_std": float(preds.ensemble_std[i])})
        else:
            row.update(label=int(labels[i]), single_pred=int(preds.single[i].argmax()),
                       single_probs=_floats(preds.single[i]))
            if ens is not None:
                row.update(ensemble_pred=int(preds.ensemble[i].argmax()), ensemble_probs=_floats(preds.ensemble[i]),
                           uncertainty={"entropy": float(_entropy(preds.ensemble[i])),
                                        "mutual_information": float(preds.ensemble_std[i])})
        rows.append(row)
    return EvalResult(single=single, ensemble=ens, rows=rows)


@torch.no_grad()
def _evaluate_span(model: torch.nn.Module, data: TaskData, *, batch_size: int, ensemble: int,
                   chunk_size: int | None, seed: int) -> EvalResult:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import default_data_collator

    from .ensemble import ensemble_predict
    from .tasks import compute_metrics, postprocess_squad

    spec = data.spec
    examples = data.raw["validation"]
    features = data.extras["eval_features"]
    inputs_only = features.remove_columns([c for c in ("example_id", "offset_mapping") if c in features.column_names])
    loader = DataLoader(inputs_only, batch_size=batch_size, collate_fn=default_data_collator)
    device = next(model.parameters()).device
    starts, ends, ens_starts, ens_ends, start_mi, end_mi = [], [], [], [], [], []
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(tqdm(loader, desc="evaluate", leave=False)):
            inputs = {k: v.to(device) for k, v in batch.items()}
            out = model(**inputs)
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
            if ensemble:
                ens = ensemble_predict(model, inputs, ensemble, chunk_size=chunk_size, seed=seed * 1_000_003 + i)
                ens_starts.append(ens.start_probs.cpu())
                ens_ends.append(ens.end_probs.cpu())
                start_mi.append((_entropy(ens.start_probs) - _entropy(ens.member_start_probs).mean(0)).cpu())
                end_mi.append((_entropy(ens.end_probs) - _entropy(ens.member_end_probs).mean(0)).cpu())
    finally:
        model.train(was_training)
    version_2 = spec.name == "squad_v2"
    single_text = postprocess_squad(examples, features, torch.cat(starts).numpy(), torch.cat(ends).numpy(),
                                    version_2_with_negative=version_2)
    single = {**compute_metrics(spec, single_text, examples), "n": len(examples)}
    ens_text, ens_metrics = None, None
    if ensemble:
        ens_text = postprocess_squad(examples, features, torch.cat(ens_starts).numpy(), torch.cat(ens_ends).numpy(),
                                     score_type="probs", version_2_with_negative=version_2)
        ens_metrics = {**compute_metrics(spec, ens_text, examples), "n": len(examples), "ensemble_size": ensemble}
        mi = (torch.cat(start_mi).clamp_min(0) + torch.cat(end_mi).clamp_min(0)) / 2
        by_example: dict[str, list[float]] = {}
        for fi, ex_id in enumerate(features["example_id"]):
            by_example.setdefault(ex_id, []).append(float(mi[fi]))
    rows = []
    for i, (ex_id, answers) in enumerate(zip(examples["id"], examples["answers"])):
        row: dict[str, Any] = {"index": i, "id": ex_id, "answers": list(answers["text"]),
                               "single_prediction": single_text[ex_id]}
        if ens_text is not None:
            windows = by_example.get(ex_id, [0.0])
            row.update(ensemble_prediction=ens_text[ex_id],
                       uncertainty={"mutual_information": float(np.mean(windows)), "windows": len(windows)})
        rows.append(row)
    return EvalResult(single=single, ensemble=ens_metrics, rows=rows)


def _choice_token_ids(tokenizer: Any) -> list[int]:
    from .tasks import MMLU_CHOICES

    ids = []
    for letter in MMLU_CHOICES:
        tokens = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise UsageError(f"the tokenizer splits the MMLU answer {letter!r} into {len(tokens)} tokens; MMLU "
                             "scoring needs single-token answers (use a causal LM tokenizer such as SmolLM2's)")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise UsageError(f"the tokenizer maps the MMLU answers {list(MMLU_CHOICES)} to repeated ids {ids}")
    return ids


@torch.no_grad()
def _score_choices(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], choice_ids: list[int], *,
                   batch_size: int, ensemble: int, chunk_size: int | None, seed: int, max_len: int,
                   desc: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Choice probabilities of the single pass and the ensemble (plus its mutual information), left-padded."""
    import inspect

    from tqdm.auto import tqdm

    from .ensemble import ensemble_score_choices

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep_last = "logits_to_keep" in inspect.signature(base.forward).parameters
    choices = torch.tensor(choice_ids)
    singles, ensembles, mis = [], [], []
    was_training = model.training
    model.eval()
    try:
        for b, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False)):
            ids = [seq[-max_len:] for seq in tokenizer(list(prompts[start:start + batch_size]))["input_ids"]]
            width = max(len(s) for s in ids)
            input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in ids])
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
            kwargs = {"logits_to_keep": 1} if keep_last else {}
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs).logits
            singles.append(logits[:, -1, choices.to(logits.device)].float().softmax(-1).cpu())
            if ensemble:
                out = ensemble_score_choices(model, input_ids, choice_ids, ensemble, attention_mask=mask,
                                             chunk_size=chunk_size, seed=seed * 1_000_003 + b)
                ensembles.append(out.probs.cpu())
                mis.append(out.mutual_information.cpu())
    finally:
        model.train(was_training)
    return (torch.cat(singles), torch.cat(ensembles) if ensembles else None, torch.cat(mis) if mis else None)


@torch.no_grad()
def _sft_loss(model: torch.nn.Module, dataset: Any, collator: Any, *, batch_size: int) -> float:
    """Token-level mean next-token NLL of the responses (single pass, eval mode) on the SFT validation split."""
    from torch.utils.data import DataLoader

    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            labels = batch["labels"][:, 1:].to(device)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _evaluate_mmlu(model: torch.nn.Module, data: TaskData, tokenizer: Any, *, batch_size: int, ensemble: int,
                   chunk_size: int | None, seed: int) -> EvalResult:
    """MMLU 0-shot and 5-shot (``mmlu_<k>shot``: micro ``accuracy``, ``accuracy_macro`` over subjects,
    ``accuracy_<subject>``, ece/nll/brier on the 4 choice probabilities); top-level ``accuracy`` and
    ``accuracy_macro`` are the means over the two settings. The single pass also reports the SFT validation loss."""
    from .calibration import classification_calibration
    from .tasks import MMLU_CHOICES, mmlu_metrics

    choice_ids = _choice_token_ids(tokenizer)
    max_len = min(MMLU_MAX_LEN, int(getattr(model.config, "max_position_embeddings", MMLU_MAX_LEN) or MMLU_MAX_LEN))
    info = data.metadata.setdefault("mmlu", {})
    info["max_prompt_tokens"] = max_len
    info["left_truncated_prompts"] = {}
    single: dict[str, Any] = {}
    ens: dict[str, Any] | None = {"ensemble_size": ensemble} if ensemble else None
    rows: list[dict[str, Any]] = []
    for shots, questions in data.extras["mmlu"].items():
        key = f"mmlu_{shots}shot"
        labels = torch.tensor(list(questions["answer"]))
        lengths = [len(ids) for ids in tokenizer(list(questions["prompt"]))["input_ids"]]
        info["left_truncated_prompts"][key] = sum(n > max_len for n in lengths)
        subjects = list(questions["subject"])
        probs, ens_probs, mi = _score_choices(model, tokenizer, questions["prompt"], choice_ids,
                                              batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size,
                                              seed=seed + 7919 * shots, max_len=max_len, desc=f"MMLU {shots}-shot")

        def metrics(p: torch.Tensor, labels: torch.Tensor = labels, subjects: list[str] = subjects) -> dict[str, Any]:
            calibration = classification_calibration(p, labels)
            return {**mmlu_metrics(p.numpy(), labels.numpy(), subjects),
                    **{k: calibration[k] for k in ("ece", "nll", "brier")}, "n": len(labels)}

        single[key] = metrics(probs)
        if ens is not None:
            ens[key] = metrics(ens_probs)
        for i in range(len(labels)):
            row: dict[str, Any] = {"index": i, "setting": key, "subject": subjects[i], "label": int(labels[i]),
                                   "label_letter": MMLU_CHOICES[int(labels[i])], "single_pred": int(probs[i].argmax()),
                                   "single_probs": _floats(probs[i])}
            if ens_probs is not None:
                row.update(ensemble_pred=int(ens_probs[i].argmax()), ensemble_probs=_floats(ens_probs[i]),
                           uncertainty={"entropy": float(_entropy(ens_probs[i])),
                                        "mutual_information": float(mi[i])})
            rows.append(row)
    sft_loss = _sft_loss(model, data.eval_loss, data.collator, batch_size=batch_size)
    single["sft_validation_loss"] = sft_loss
    single["sft_validation_perplexity"] = float(math.exp(min(sft_loss, 50.0)))
    for target in (single, ens):
        if target is not None:
            keys = [f"mmlu_{s}shot" for s in MMLU_SHOTS]
            target["accuracy"] = float(np.mean([target[k]["accuracy"] for k in keys]))
            target["accuracy_macro"] = float(np.mean([target[k]["accuracy_macro"] for k in keys]))
    return EvalResult(single=single, ensemble=ens, rows=rows)


# ================================================================================================ run folders
@dataclass
class RunPlan:
    """Where a train run works and ends up."""

    output: Path  # the final run folder
    work: Path  # where training happens: the staging folder or, when resuming a finished run, the output itself
    staging: bool  # whether `work` is renamed to `output` at the end
    resume_from: Path | None  # checkpoint to continue from
    fresh: bool  # whether `work` is (re)created empty


def staging_path(output: Path) -> Path:
    """The hidden folder next to `output` where a run is built."""
    return output.parent / f".{output.name}.partial"


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Decide the run folders from --output/--resume/--overwrite, without touching the disk."""
    output = Path(args.output).expanduser()
    staging = staging_path(output)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} exists and is not a folder")
    if args.resume:
        for folder, is_staging in ((output, False), (staging, True)):
            found = _checkpoints(folder)
            if found:
                return RunPlan(output, folder, is_staging, found[-1], fresh=False)
        where = f"{str(output)!r}" + (f" or the interrupted run in {str(staging)!r}" if staging.exists() else "")
        raise UsageError(f"--resume: no checkpoint-N folder in {where} to continue from (train with --save-steps)")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"--output {str(output)!r} exists and is not empty; pass --resume to continue it, "
                         "--overwrite to replace it, or another --output")
    if _checkpoints(staging) and not args.overwrite:
        raise UsageError(f"an interrupted run of {str(output)!r} is in {str(staging)!r}; pass --resume to continue "
                         "it or --overwrite to start over")
    return RunPlan(output, staging, True, None, fresh=True)


def _check_resume_config(plan: RunPlan, args: argparse.Namespace) -> None:
    stored_path = plan.work / RUN_CONFIG_FILE
    if plan.fresh or not stored_path.is_file():
        return
    stored = json.loads(stored_path.read_text(encoding="utf-8")).get("args", {})
    now = jsonable(vars(args))
    changed = [f"--{k.replace('_', '-')} {stored.get(k)!r} -> {now.get(k)!r}" for k in RESUME_KEYS
               if k in stored and stored.get(k) != now.get(k)]
    if changed:
        raise UsageError(f"--resume with settings that differ from the run being resumed: {', '.join(changed)}")


def _check_args(args: argparse.Namespace) -> None:
    if args.ensemble < 0:
        raise UsageError(f"--ensemble must be >= 0, got {args.ensemble}")
    if args.epochs <= 0 and args.max_steps <= 0:
        raise UsageError("give --epochs > 0 or --max-steps > 0")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.alpha <= 0:
        raise UsageError(f"--alpha must be > 0, got {args.alpha}")


# ================================================================================================ train
def _log_callback() -> Any:
    from transformers import TrainerCallback

    class LogToFile(TrainerCallback):
        """Trainer log entries (loss, learning rate, eval loss) into the run log."""

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401 - Trainer hook
            if logs and state.is_world_process_zero:
                logger.info("step %d: %s", state.global_step, json.dumps(jsonable(logs), sort_keys=True))

    return LogToFile()


def run_train(args: argparse.Namespace, *, callbacks: Sequence[Any] = ()) -> Path:
    """``loradrop train``: fine-tune, evaluate, and write the run folder; returns it.

    `callbacks` are extra Trainer callbacks (for tests and embedding).
    """
    from peft import get_peft_model

    from .model import apply_lora_dropout
    from .models import load_model, load_tokenizer
    from .training import build_training_args

    _check_args(args)
    if args.data_dir is not None and Path(args.data_dir).expanduser().exists():
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())  # recorded for resume and eval
    plan = plan_run(args)
    _check_resume_config(plan, args)
    ld_config = lora_dropout_config(args)
    from .tasks import get_task

    spec = get_task(registry_task(args.task, args.data_dir))
    model_name = args.model or default_model(spec.kind)
    check_model_fits(model_name, spec.kind)
    tokenizer = load_tokenizer(model_name)
    data = load_data(args.task, args, tokenizer, max_seq_len=args.max_seq_len, seed=args.seed,
                     max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples)
    world_size = _world_size()
    total_steps = _train_steps(len(data.train), args, world_size)

    torch.manual_seed(args.seed)  # new heads start the same in every process and every resumed run
    base = prepare_base(load_model(model_name, spec.kind, num_labels=spec.num_labels or None), tokenizer)
    if spec.kind == "causal_lm":
        base.config.use_cache = False
    target_modules = ([m.strip() for m in args.target_modules.split(",") if m.strip()] if args.target_modules
                      else default_target_modules(base))
    peft_config = build_peft_config(args, spec.kind, target_modules, total_steps)
    model = get_peft_model(base, peft_config)
    if ld_config is not None:
        apply_lora_dropout(model, ld_config)
    ensemble = args.ensemble if ld_config is not None else 0

    logging_steps = max(1, min(50, total_steps // 20))
    training_args = build_training_args(plan.work, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                                        batch_size=args.batch_size, seed=args.seed, logging_steps=logging_steps,
                                        save_steps=args.save_steps, eval_steps=args.eval_steps,
                                        extra=_ddp_options(world_size))
    main = _is_main(training_args)
    with training_args.main_process_first(local=False, desc="prepare the run folder"):
        if main:
            if plan.fresh:
                shutil.rmtree(plan.work, ignore_errors=True)
            plan.work.mkdir(parents=True, exist_ok=True)
    try:
        with _run_log(plan.work / LOG_FILE if main else None):
            result = _train_and_write(args, plan, spec, data, tokenizer, model, model_name, peft_config, ld_config,
                                      ensemble, training_args, total_steps, target_modules, callbacks)
    except BaseException:
        if main and plan.fresh and not _checkpoints(plan.work):
            shutil.rmtree(plan.work, ignore_errors=True)
        elif main and _checkpoints(plan.work):
            logger.warning("loradrop: the run stopped; continue it with --resume (checkpoints in %s)", plan.work)
        raise
    return result


def _train_and_write(args: argparse.Namespace, plan: RunPlan, spec: Any, data: TaskData, tokenizer: Any,
                     model: Any, model_name: str, peft_config: Any, ld_config: LoraDropoutConfig | None,
                     ensemble: int, training_args: Any, total_steps: int, target_modules: list[str],
                     callbacks: Sequence[Any]) -> Path:
    """Train (or continue) with the Trainer, then on rank 0 evaluate and write the run folder."""
    from .training import loss_history, make_trainer

    main = _is_main(training_args)
    if main:
        write_json_atomic(plan.work / RUN_CONFIG_FILE, {"args": jsonable(vars(args)), "model": model_id(model_name),
                                                         "task": spec.name})
        logger.info("loradrop train: %s", " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
        logger.info("data: %s", data.metadata.get("summary", ""))
    extra_callbacks = [_log_callback(), *callbacks]
    if args.method == "adalora":
        from .adalora import AdaLoraCallback

        extra_callbacks.insert(0, AdaLoraCallback())
    eval_dataset = data.eval_loss if args.eval_steps else None
    trainer = make_trainer(model, training_args, data.train, eval_dataset, collator=data.collator,
                           callbacks=extra_callbacks)
    if spec.kind != "causal_lm":
        # Classification/QA heads average their loss themselves and ignore `num_items_in_batch`; without this the
        # Trainer would still multiply their loss by the number of processes under DDP.
        trainer.model_accepts_loss_kwargs = False
    if plan.resume_from is not None:
        logger.info("resuming from %s", plan.resume_from)
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    train_s = time.perf_counter() - start
    _leave_process_group()
    if not main:
        return plan.output
    start = time.perf_counter()
    result = evaluate(model, data, tokenizer, batch_size=args.batch_size, ensemble=ensemble,
                      chunk_size=args.chunk_size, seed=args.seed, max_seq_len=args.max_seq_len)
    eval_s = time.perf_counter() - start

    adapter_tmp = plan.work / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(adapter_tmp, ignore_errors=True)
    model.save_pretrained(str(adapter_tmp))
    _replace_dir(adapter_tmp, plan.work / ADAPTER_DIR)
    _write_jsonl(plan.work / "predictions.jsonl", result.rows)
    history = loss_history(trainer)
    write_json_atomic(plan.work / "loss_history.json", history)
    metrics = {
        "task": args.task,
        "registry_task": spec.name,
        "kind": spec.kind,
        "model": model_id(model_name),
        "seed": args.seed,
        "config": {
            "args": jsonable(vars(args)),
            "method": args.method,
            "peft": jsonable(peft_config.to_dict()),
            "lora_dropout": ld_config.to_dict() if ld_config is not None else None,
            "target_modules": target_modules,
            "ensemble": ensemble,
            "eval_batch_size": args.batch_size,
            "total_steps": total_steps,
            "world_size": int(training_args.world_size),
            "per_device_batch_size": args.batch_size,
            **{k: v for k, v in data.extras.items() if k == "doc_stride"},
        },
        "versions": versions(),
        "wall_time": {"train_s": train_s, "eval_s": eval_s},
        "data": data.metadata,
        "eval_split": "mmlu:test" if spec.kind == "causal_lm" else data.eval_split,
        "eval": {"single": result.single, "ensemble": result.ensemble},
        "train": {"global_step": int(trainer.state.global_step), "train_loss": float(train_output.training_loss),
                  "resumed_from": plan.resume_from.name if plan.resume_from else None,
                  "checkpoints": [p.name for p in _checkpoints(plan.work)]},
        "files": {"adapter": ADAPTER_DIR, "predictions": "predictions.jsonl", "loss_history": "loss_history.json",
                  "log": LOG_FILE},
    }
    write_json_atomic(plan.work / METRICS_FILE, jsonable(metrics))
    logger.info("eval single: %s", json.dumps(jsonable(_headline(result.single))))
    if result.ensemble is not None:
        logger.info("eval ensemble: %s", json.dumps(jsonable(_headline(result.ensemble))))
    if plan.staging:
        if plan.output.exists():
            shutil.rmtree(plan.output)
        plan.output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(plan.work, plan.output)
    _print_summary(plan.output, spec.name, result)
    return plan.output


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (per-subject MMLU numbers left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if not k.startswith("accuracy_") or k == "accuracy_macro"}
        else:
            out[key] = value
    return out


def _print_summary(output: Path, task: str, result: EvalResult) -> None:
    def fmt(metrics: dict[str, Any]) -> str:
        flat = {k: v for k, v in _headline(metrics).items() if not isinstance(v, dict)}
        for key, value in metrics.items():
            if isinstance(value, dict):
                flat[f"{key}.accuracy"] = value.get("accuracy")
        return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat.items())

    print(f"{task} single pass: {fmt(result.single)}", flush=True)
    if result.ensemble is not None:
        print(f"{task} ensemble:    {fmt(result.ensemble)}", flush=True)
    print(f"wrote {output}/{METRICS_FILE}, {ADAPTER_DIR}/, predictions.jsonl, loss_history.json, {LOG_FILE}",
          flush=True)


# ================================================================================================ eval
def _find_run(adapter: Path) -> tuple[Path, Path, dict[str, Any] | None]:
    """(adapter folder, run folder, the run's metrics) for --adapter given as an adapter or a run folder."""
    if not adapter.exists():
        raise UsageError(f"--adapter {str(adapter)!r} does not exist")
    if (adapter / ADAPTER_DIR / "adapter_config.json").is_file():
        adapter_dir, run_dir = adapter / ADAPTER_DIR, adapter
    elif (adapter / "adapter_config.json").is_file():
        adapter_dir, run_dir = adapter, adapter.parent
    else:
        raise UsageError(f"--adapter {str(adapter)!r} holds no adapter_config.json (nor {ADAPTER_DIR}/ of a run)")
    for candidate in (run_dir / METRICS_FILE, adapter_dir / METRICS_FILE):
        if candidate.is_file():
            return adapter_dir, run_dir, json.loads(candidate.read_text(encoding="utf-8"))
    return adapter_dir, run_dir, None


def run_eval(args: argparse.Namespace) -> Path:
    """``loradrop eval``: reload a run's adapter on its base model, re-evaluate, write eval_metrics.json."""
    from peft import PeftModel

    from .model import from_pretrained
    from .models import load_model, load_tokenizer
    from .tasks import get_task

    if args.ensemble < 0:
        raise UsageError(f"--ensemble must be >= 0, got {args.ensemble}")
    adapter_dir, run_dir, run = _find_run(Path(args.adapter).expanduser())
    run_args = (run or {}).get("config", {}).get("args", {})
    task = args.task or (run or {}).get("task")
    if task is None:
        raise UsageError(f"no {METRICS_FILE} next to {str(adapter_dir)!r}; pass --task and --model")
    model_name = args.model or (run or {}).get("model")
    if model_name is None:
        raise UsageError(f"no {METRICS_FILE} next to {str(adapter_dir)!r} records the base model; pass --model")
    same_task = run is not None and task == run.get("task")
    data_args = argparse.Namespace(data_dir=args.data_dir if args.data_dir is not None
                                   else (run_args.get("data_dir") if same_task else None))
    seed = args.seed if args.seed is not None else int(run_args.get("seed", 0))
    data_seed = int(run_args.get("seed", seed)) if same_task else seed  # the run's splits, never its train rows
    max_seq_len = args.max_seq_len or int(run_args.get("max_seq_len", 128))
    max_eval = args.max_eval_samples if args.max_eval_samples is not None else (
        run_args.get("max_eval_samples") if same_task else None)
    batch_size = args.batch_size or int((run or {}).get("config", {}).get("eval_batch_size", 32))
    spec = get_task(registry_task(task, data_args.data_dir))
    check_model_fits(model_name, spec.kind)
    has_loradrop = (adapter_dir / CONFIG_FILE_NAME).is_file()
    ensemble = args.ensemble if has_loradrop else 0

    tokenizer = load_tokenizer(model_name)
    data = load_data(task, data_args, tokenizer, max_seq_len=max_seq_len, seed=data_seed, max_train_samples=None,
                     max_eval_samples=max_eval, need_train=False)
    torch.manual_seed(seed)
    base = prepare_base(load_model(model_name, spec.kind, num_labels=spec.num_labels or None), tokenizer)
    model = from_pretrained(base, adapter_dir) if has_loradrop else PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    start = time.perf_counter()
    result = evaluate(model, data, tokenizer, batch_size=batch_size, ensemble=ensemble, chunk_size=args.chunk_size,
                      seed=seed, max_seq_len=max_seq_len)
    eval_s = time.perf_counter() - start
    out_dir = Path(args.output).expanduser() if args.output else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "eval_predictions.jsonl", result.rows)
    metrics = {
        "task": task, "registry_task": spec.name, "kind": spec.kind, "model": model_id(model_name),
        "adapter": str(adapter_dir.resolve()), "seed": seed,
        "config": {"args": jsonable(vars(args)), "ensemble": ensemble, "batch_size": batch_size,
                   "max_seq_len": max_seq_len, "max_eval_samples": max_eval, "data_seed": data_seed,
                   "data_dir": data_args.data_dir},
        "versions": versions(), "wall_time": {"eval_s": eval_s}, "data": data.metadata,
        "eval_split": "mmlu:test" if spec.kind == "causal_lm" else data.eval_split,
        "eval": {"single": result.single, "ensemble": result.ensemble},
        "files": {"predictions": "eval_predictions.jsonl"},
    }
    write_json_atomic(out_dir / EVAL_METRICS_FILE, jsonable(metrics))
    print(f"{spec.name} single pass: {json.dumps(jsonable(_headline(result.single)))}", flush=True)
    if result.ensemble is not None:
        print(f"{spec.name} ensemble:    {json.dumps(jsonable(_headline(result.ensemble)))}", flush=True)
    print(f"wrote {out_dir / EVAL_METRICS_FILE}", flush=True)
    return out_dir / EVAL_METRICS_FILE
