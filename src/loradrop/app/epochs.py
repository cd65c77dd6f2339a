"""Scoring during training: after every epoch, the single pass on the validation split (model selection) and on
the test split (what would be reported), so a study can report the final and the best-validation checkpoint, ECE
over training and the train / validation loss gap without saving a checkpoint per epoch."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from ..errors import UsageError

logger = logging.getLogger("loradrop.app")
LOWER_IS_BETTER = ("loss", "nll", "ece", "brier")


def check_task_options(settings: Any, spec: Any) -> None:
    """Refuse the run options a task's evaluation cannot serve: a held-out validation split and per-epoch scoring
    need an ``evaluate`` that scores any split (`TaskSpec.scores_splits`: classification, regression, span and
    class-scoring tasks); MC dropout needs a class or regression head's evaluation."""
    problems = []
    needs_splits = [k for k in ("holdout_fraction", "epoch_eval") if getattr(settings, k)]
    if needs_splits and not spec.scores_splits:
        problems.append(f"{', '.join(needs_splits)}: supported for classification, regression and span tasks only")
    if settings.ensemble_kind == "mc_dropout" and spec.kind not in ("classification", "regression") \
            and not spec.predicts_classes:
        problems.append("test_ensemble='mc_dropout': supported for classification and regression tasks only")
    if problems:
        raise UsageError(f"{'; '.join(problems)}, not {spec.name} ({spec.kind})")


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether `new` improves on `old` for `metric` (losses and calibration errors go down, the rest up)."""
    if old is None:
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


class EpochEvaluation(TrainerCallback):
    """Evaluates `splits` with the task's own evaluation after each epoch and keeps the best epoch's predictions.

    ``evaluate(split)`` returns an `EvalResult`; the best epoch is the one with the best ``select_metric`` of the
    single pass on ``select_split``. Evaluation runs in eval mode (LoRA Dropout draws no training masks there) and
    never touches the training random state, so training is the same with and without this callback.
    """

    def __init__(self, evaluate: Any, splits: tuple[str, ...], select_split: str, select_metric: str, *,
                 patience: int | None = None) -> None:
        self.evaluate = evaluate
        self.patience = patience
        self.stopped: dict[str, Any] | None = None  # where early stopping ended the run
        self._best_weights: dict[str, Any] | None = None
        self.splits = splits
        self.select_split = select_split
        self.select_metric = select_metric
        self.epochs: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_rows: dict[str, list[dict[str, Any]]] = {}
        self._logged = 0

    def _train_loss(self, state: Any) -> float | None:
        losses = [e["loss"] for e in state.log_history[self._logged:] if "loss" in e]
        self._logged = len(state.log_history)
        return sum(losses) / len(losses) if losses else None

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: D401 - Trainer hook
        if not state.is_world_process_zero:
            return
        record: dict[str, Any] = {"epoch": round(float(state.epoch or 0), 4), "step": int(state.global_step),
                                  "train_loss": self._train_loss(state)}
        rows = {}
        for split in self.splits:
            result = self.evaluate(split)
            record[split] = {"single": result.single, "ensemble": result.ensemble}
            rows[split] = result.rows
        self.epochs.append(record)
        value = record[self.select_split]["single"].get(self.select_metric)
        if value is not None and better(self.select_metric, value, None if self.best is None else self.best["value"]):
            self.best = {"epoch": record["epoch"], "step": record["step"], "split": self.select_split,
                         "metric": self.select_metric, "value": value,
                         **{split: record[split] for split in self.splits}}
            self.best_rows = rows
            model = kwargs.get("model")
            if self.patience is not None and model is not None:
                self._best_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        logger.info("epoch %s: %s single %s = %s", record["epoch"], self.select_split, self.select_metric, value)
        if self.patience is not None and self.best is not None:
            since = sum(1 for r in self.epochs if r["step"] > self.best["step"])
            if since >= self.patience:
                control.should_training_stop = True
                self.stopped = {"epoch": record["epoch"], "step": record["step"], "patience": self.patience,
                                "best_epoch": self.best["epoch"], "best_step": self.best["step"]}
                logger.info("early stopping after epoch %s: no better %s %s for %d epoch(s) (best: epoch %s)",
                            record["epoch"], self.select_split, self.select_metric, since, self.best["epoch"])

    def on_train_end(self, args, state, control, model=None, **kwargs):  # noqa: D401 - Trainer hook
        """With early stopping: restore the best epoch's trainable weights."""
        if self._best_weights is None or model is None or self.best is None:
            return
        if self.best["step"] != state.global_step:
            import torch

            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in self._best_weights.items():
                    params[name].copy_(value)
            logger.info("restored the weights of the best epoch (%s, step %d)", self.best["epoch"], self.best["step"])
        self._best_weights = None
