"""Preparation and evaluation shared by the sequence-level tasks (GLUE, tweets): classification heads, scored with
the official metrics plus ECE / NLL / Brier, and regression heads (STS-B), scored with Pearson / Spearman."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import DatasetDict

from ..calibration import classification_calibration, regression_calibration
from ..ensemble import entropy
from ..errors import DataError, UsageError
from ..prediction import predict_classification
from .spec import EvalResult, TaskData, TaskSpec

CALIBRATION_METRICS = ("ece", "nll", "brier")


def floats(values: Any) -> list[float]:
    """A flat list of Python floats (for prediction rows)."""
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def classification_metrics(spec: TaskSpec, probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The task's official metrics of one set of class probabilities, its ECE / NLL / Brier, and ``n``."""
    out: dict[str, Any] = dict(spec.metrics(spec, probs.numpy(), labels.numpy()))
    calibration = classification_calibration(probs, labels)
    out.update({k: calibration[k] for k in CALIBRATION_METRICS})
    out["n"] = len(labels)
    return out


def class_prediction_fields(single: torch.Tensor, ensemble: torch.Tensor | None = None,
                            mutual_information: Any = None) -> dict[str, Any]:
    """A prediction row's class fields: the single pass's prediction and probabilities and, with an ensemble, its
    prediction, probabilities and uncertainty (entropy of the averaged probabilities, mutual information)."""
    fields: dict[str, Any] = {"single_pred": int(single.argmax()), "single_probs": floats(single)}
    if ensemble is not None:
        fields.update(ensemble_pred=int(ensemble.argmax()), ensemble_probs=floats(ensemble),
                      uncertainty={"entropy": float(entropy(ensemble.double())),
                                   "mutual_information": float(mutual_information)})
    return fields


def check_encoded(spec: TaskSpec, max_seq_len: int, **splits: Any) -> None:
    """Refuse a split that tokenization left empty."""
    for name, dataset in splits.items():
        if dataset is not None and len(dataset) == 0:
            raise DataError(f"{spec.name}: the {name} split is empty after tokenization (max_seq_len {max_seq_len} "
                            "too small?)")


def encode_splits(spec: TaskSpec, raw: DatasetDict, tokenizer: Any, max_seq_len: int,
                  need_train: bool) -> tuple[str, DatasetDict, Any, Any]:
    """``(eval_split, encoded, train, eval_loss)``: the evaluation split (``test`` when the data has one, else
    ``validation``), train and validation (the Trainer's eval loss) when training, tokenized by the task's
    preprocessor and checked non-empty."""
    eval_split = "test" if "test" in raw else "validation"
    splits = [*(["train", "validation"] if need_train else []), eval_split]
    encoded = spec.preprocessor(spec, DatasetDict({k: raw[k] for k in dict.fromkeys(splits)}), tokenizer,
                                max_seq_len)
    train = encoded["train"] if need_train else None
    eval_loss = encoded["validation"] if need_train else None
    check_encoded(spec, max_seq_len, train=train, validation=eval_loss)
    return eval_split, encoded, train, eval_loss


def unsupported_options(spec: TaskSpec, options: dict[str, Any]) -> None:
    """Refuse evaluation options a task family does not implement (per-split scoring, MC dropout), by name."""
    given = {k: v for k, v in options.items() if v not in (None, False) and k != "progress"}
    if given:
        raise UsageError(f"{spec.name} ({spec.kind}) evaluation does not support {sorted(given)}; it scores its "
                         f"evaluation split with LoRA Dropout ensembles only")


def prepare_classification(spec: TaskSpec, raw: DatasetDict, tokenizer: Any, *, max_seq_len: int,
                           need_train: bool = True, **_: Any) -> TaskData:
    """Tokenized train / validation (for the Trainer's eval loss) and the evaluation split: ``test`` where the task
    has one (tweets), else ``validation`` (GLUE dev)."""
    from transformers import DataCollatorWithPadding

    from .base import get_metadata

    eval_split, encoded, train, eval_loss = encode_splits(spec, raw, tokenizer, max_seq_len, need_train)
    return TaskData(spec=spec, raw=raw, train=train, eval_loss=eval_loss, eval_split=eval_split,
                    collator=DataCollatorWithPadding(tokenizer), metadata=get_metadata(raw),
                    extras={"encoded": {k: v for k, v in encoded.items() if k != "train"}})


def evaluate_classification(model: torch.nn.Module, data: TaskData, tokenizer: Any = None, *, batch_size: int,
                            ensemble: int, chunk_size: int | None, seed: int, split: str | None = None,
                            mc_dropout: bool = False, progress: bool = True) -> EvalResult:
    """Official metrics (+ ECE/NLL/Brier for classification; for regression the ensemble's Gaussian NLL and 90%
    interval coverage/width from its mean and spread) of the single pass and the ensemble on `split`
    (default: the task's evaluation split); `mc_dropout` makes the ensemble MC dropout (a baseline)."""
    spec = data.spec
    regression = spec.kind == "regression"
    split = split or data.eval_split
    if split not in data.extras["encoded"]:
        raise DataError(f"{spec.name}: no prepared split {split!r}; prepared: {sorted(data.extras['encoded'])}")
    preds = predict_classification(model, data.extras["encoded"][split], data.collator, batch_size=batch_size,
                                   ensemble=ensemble, chunk_size=chunk_size, seed=seed, regression=regression,
                                   mc_dropout=mc_dropout, progress=progress)
    labels = preds.labels
    raw = data.raw[split]
    ids = list(raw["idx"]) if "idx" in raw.column_names else list(range(len(raw)))

    def metrics(values: torch.Tensor) -> dict[str, Any]:
        if not regression:
            return classification_metrics(spec, values, labels)
        return {**spec.metrics(spec, values.numpy(), labels.numpy()), "n": len(labels)}

    single = metrics(preds.single)
    ens = {**metrics(preds.ensemble), "ensemble_size": ensemble} if preds.ensemble is not None else None
    if regression and ens is not None:  # the ensemble's spread is a predictive std (the single pass has none)
        ens.update(regression_calibration(preds.ensemble, preds.ensemble_std, labels))
    rows = []
    for i in range(len(labels)):
        row: dict[str, Any] = {"index": i, "id": ids[i]}
        if regression:
            row.update(label=float(labels[i]), single=float(preds.single[i]))
            if ens is not None:
                row.update(ensemble_mean=float(preds.ensemble[i]),
                           uncertainty={"ensemble_std": float(preds.ensemble_std[i])})
        else:
            row.update(label=int(labels[i]), **class_prediction_fields(
                preds.single[i], *((preds.ensemble[i], preds.mutual_information[i]) if ens is not None else ())))
        rows.append(row)
    return EvalResult(single=single, ensemble=ens, rows=rows)
