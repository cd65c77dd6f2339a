"""Typed settings: the one description of a run.

`TrainSettings`, `EvalSettings` and `DemoSettings` are what ``loradrop train`` / ``eval`` / ``demo`` run. The command
line only parses flags into them (field names are the flags with ``_`` for ``-``); Python users and the sweep engine
build them directly::

    from loradrop.app import TrainSettings, train

    result = train(TrainSettings(task="rte", output="runs/rte", p=0.5, samples=4, epochs=10))
    print(result.metrics["eval"]["ensemble"]["accuracy"])

Every setting is checked in ``__post_init__`` and every problem is reported at once (`SettingsError`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import LoraDropoutConfig
from ..tasks.spec import CHOICE_SCORINGS
from .settings_base import Checks, SettingsBase

METHODS = ("lora", "adalora")
# transformers' SchedulerType values (checked against transformers by the tests; kept here so that building settings
# does not import transformers)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
# TrainingArguments that a run sets itself: --trainer-arg refuses them (the first-class flag where there is one)
OWNED_TRAINER_ARGS = {
    "output_dir": "--output", "num_train_epochs": "--epochs", "max_steps": "--max-steps", "learning_rate": "--lr",
    "per_device_train_batch_size": "--batch-size", "per_device_eval_batch_size": "--batch-size", "seed": "--seed",
    "data_seed": "--seed", "save_strategy": "--save-steps", "save_steps": "--save-steps",
    "eval_strategy": "--eval-steps", "eval_steps": "--eval-steps", "warmup_steps": "--warmup-steps/--warmup-ratio",
    "lr_scheduler_type": "--lr-scheduler", "weight_decay": "--weight-decay",
    "gradient_accumulation_steps": "--gradient-accumulation-steps", "bf16": "--bf16", "fp16": "--fp16",
    "gradient_checkpointing": "--gradient-checkpointing", "report_to": "--report-to",
    "remove_unused_columns": None, "resume_from_checkpoint": "--resume", "logging_steps": None,
    "disable_tqdm": None, "load_best_model_at_end": "--early-stopping-patience",
}
TEST_ENSEMBLES = ("auto", "mc_dropout", "masks", "none")
# transformers' attention backends (``attn_implementation`` of from_pretrained); None keeps transformers' default (sdpa)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
LAPLACE_PRIORS = ("auto", "val_nll", "marglik")  # --laplace: prior precision by validation NLL or marginal likelihood
# Settings that must not change between a run and its --resume (the result would no longer be one run).
RESUME_KEYS = ("task", "model", "data_dir", "method", "r", "alpha", "target_modules", "no_lora_dropout",
               "peft_dropout", "p", "samples", "strategy", "mask_scope", "rescale", "epochs", "max_steps", "lr",
               "batch_size", "max_seq_len", "max_train_samples", "holdout_fraction", "seed", "warmup_steps",
               "warmup_ratio", "lr_scheduler", "weight_decay", "gradient_accumulation_steps", "bf16", "fp16",
               "trainer_args", "choice_scoring")


def _lora_dropout_checks(checks: Checks, s: Any) -> None:
    """The LoRA Dropout options, validated by `LoraDropoutConfig` itself (one message per problem)."""
    checks.integer("chunk_size", s.chunk_size, minimum=1, optional=True)
    checks.integer("ensemble", s.ensemble, minimum=0)
    try:
        _config_of(s)
    except (ValueError, TypeError) as err:
        checks.add(str(err))


def ood_task_choices(task: str | None) -> list[str]:
    """OOD sets a run on `task` can score: classification tasks for a classification task (detection only: their
    labels are not its classes); for a task predicting classes through another head (`CatalogEntry.predicts_classes`:
    letter scoring) the other such tasks of its family, each also with its own accuracy / ECE / NLL / Brier.
    With no task (``loradrop eval`` reads it from the run) both kinds; empty for any other task."""
    from ..tasks import CATALOG

    entry = CATALOG.get(task) if task is not None else None

    def fits(other: Any) -> bool:
        if entry is None:
            return task is None and (other.kind == "classification" or other.predicts_classes)
        if entry.kind == "classification":
            return other.kind == "classification"
        return entry.predicts_classes and other.predicts_classes and other.family == entry.family

    return sorted(name for name, other in CATALOG.items() if name != task and fits(other))


def split_names(value: str | Sequence[str] | None) -> str | None:
    """A comma-separated string or a list of names as one comma-separated string (None stays None)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v).strip() for v in value)
    return value


def _acting_checks(checks: Checks, s: Any) -> None:
    """``ood_task`` (one or more comma-separated tasks of `ood_task_choices`) and ``conformal_alpha`` (in (0, 1)),
    both optional and for a task that classifies (a classification task or one that predicts classes)."""
    from ..tasks import CATALOG, INSTRUCT_ALIAS

    entry = CATALOG.get(s.task)
    kind = entry.kind if entry else "causal_lm" if s.task == INSTRUCT_ALIAS else None
    classifies = kind in (None, "classification") or bool(entry and entry.predicts_classes)
    if (s.ood_task is not None or s.conformal_alpha is not None) and not classifies:
        checks.add(f"ood_task and conformal_alpha need a task that predicts classes; {s.task!r} is a {kind} task")
    elif s.ood_task is not None:
        names = [n.strip() for n in s.ood_task.split(",")] if isinstance(s.ood_task, str) else []
        allowed = ood_task_choices(s.task)
        bad = [n for n in names if n not in allowed]
        if not names or bad or "" in names:
            checks.add(f"ood_task must be one or more comma-separated out-of-distribution tasks"
                       f"{f' of task {s.task!r}' if s.task else ''}, each one of {allowed}; got {s.ood_task!r}"
                       + (f" ({', '.join(map(repr, bad))} not allowed)" if bad else ""))
        elif len(set(names)) < len(names):
            checks.add(f"ood_task names a task twice: {s.ood_task!r}")
    alpha = s.conformal_alpha
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1):
        checks.add(f"conformal_alpha must be a number in (0, 1), got {alpha!r}")


def _trainer_checks(checks: Checks, s: Any) -> None:
    """The training controls, and ``trainer_args`` against TrainingArguments' own fields (transformers is imported
    only when there are any)."""
    checks.integer("warmup_steps", s.warmup_steps, minimum=0)
    checks.number("warmup_ratio", s.warmup_ratio, non_negative=True)
    if isinstance(s.warmup_ratio, (int, float)) and not isinstance(s.warmup_ratio, bool) and s.warmup_ratio >= 1:
        checks.add(f"warmup_ratio must be in [0, 1), got {s.warmup_ratio}")
    if s.warmup_steps and s.warmup_ratio:
        checks.add("give warmup_steps or warmup_ratio, not both")
    checks.choice("lr_scheduler", s.lr_scheduler, LR_SCHEDULERS)
    checks.number("weight_decay", s.weight_decay, non_negative=True)
    checks.integer("gradient_accumulation_steps", s.gradient_accumulation_steps, minimum=1)
    for name in ("bf16", "fp16", "gradient_checkpointing"):
        checks.boolean(name, getattr(s, name))
    if s.attn_implementation is not None:
        checks.choice("attn_implementation", s.attn_implementation, ATTN_IMPLEMENTATIONS)
    if s.bf16 is True and s.fp16 is True:
        checks.add("bf16 and fp16 exclude each other")
    if not isinstance(s.report_to, str) or not s.report_to.strip():
        checks.add(f"report_to must be integration names (comma-separated) or 'none', got {s.report_to!r}")
    checks.integer("early_stopping_patience", s.early_stopping_patience, minimum=1, optional=True)
    if s.early_stopping_patience is not None and s.epoch_eval is False:
        checks.add("early_stopping_patience needs epoch_eval=True (--epoch-eval): it stops on the per-epoch "
                   "validation score")
    if not isinstance(s.trainer_args, Mapping) or not all(isinstance(k, str) for k in s.trainer_args):
        checks.add(f"trainer_args must be a mapping of TrainingArguments names to values, got {s.trainer_args!r}")
        return
    if not s.trainer_args:
        return
    owned = sorted(k for k in s.trainer_args if k in OWNED_TRAINER_ARGS)
    if owned:
        checks.add("trainer_args: loradrop sets " + ", ".join(
            f"{k}" + (f" (use {OWNED_TRAINER_ARGS[k]})" if OWNED_TRAINER_ARGS[k] else "") for k in owned)
            + " itself")
    known = training_argument_names()
    unknown = sorted(k for k in s.trainer_args if k not in known and k not in OWNED_TRAINER_ARGS)
    if unknown:
        checks.add(f"trainer_args: unknown TrainingArguments field(s) {unknown} (transformers "
                   f"{_transformers_version()}; see TrainingArguments' documentation for the names)")


def training_argument_names() -> set[str]:
    """The fields of transformers' ``TrainingArguments`` that can be passed to its constructor."""
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _config_of(s: Any) -> LoraDropoutConfig:
    return LoraDropoutConfig(p=s.p, samples=s.samples, strategy=s.strategy, mask_scope=s.mask_scope,
                             rescale=s.rescale, seed=s.seed,
                             member_chunk=min(s.chunk_size, s.samples) if s.mask_scope == "batch" and isinstance(
                                 s.chunk_size, int) and isinstance(s.samples, int) else None)


@dataclass
class TrainSettings(SettingsBase):
    """One fine-tuning run: the task and data, the model and adapter, LoRA Dropout, the optimisation, the run folder.

    ``target_modules`` accepts a comma-separated string or a list of names (default: per model);
    ``no_lora_dropout=True`` trains plain LoRA / AdaLoRA (the baseline); ``peft_dropout`` is PEFT's own element-wise
    ``lora_dropout`` on the LoRA input (another baseline).

    ``choice_scoring`` is how a multiple-choice task is scored by a causal LM (commonsense, MMLU): ``"letter"`` (the
    answer letter's next-token logit, the published protocol), ``"cloze"`` (each choice's log-likelihood after the
    question, `loradrop.tasks.cloze_scoring`: for models too small to answer by letter) or ``"cloze_mean"`` (its mean
    per token: no bias for short answers).

    ``test_ensemble`` picks the test-time ensemble of ``ensemble`` members: ``"auto"`` (LoRA Dropout's masked
    members when it is on, none for a baseline), ``"mc_dropout"`` (PEFT's dropout kept on at test: MC dropout, needs
    ``peft_dropout > 0``), ``"masks"`` (LoRA Dropout masks with ``p`` at test time only, on a model trained without
    them: the paper's "test only" ablation; its single pass is the plain model) or ``"none"``.

    ``holdout_fraction`` carves a validation split out of train for model selection; the task's dev split becomes
    the test split the run is scored on. ``skip_nonfinite_steps`` skips (and counts) optimizer steps whose loss or
    gradient is not finite; by default such a step stops the run with `TrainingDivergedError`. ``epoch_eval``
    scores validation and test after every epoch (single pass; recorded in ``metrics.json`` under ``epochs`` and
    ``best_epoch``). ``ood_task`` / ``conformal_alpha`` add the ``uncertainty`` section of ``loradrop eval`` (selective
    prediction, OOD detection against each ``ood_task``, conformal sets at that alpha) to ``metrics.json``.
    ``ood_task`` is one task or several (comma-separated, or a list), see `ood_task_choices`: for a task that
    predicts classes with a causal LM (commonsense) each OOD set is also scored with the full metrics (one
    training run, several test sets: the OBQA -> ARC-C / ARC-E / MMLU protocol).
    """

    command = "train"

    task: str
    output: str | Path
    model: str | None = None
    data_dir: str | None = None
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    target_modules: str | Sequence[str] | None = None
    no_lora_dropout: bool = False
    peft_dropout: float = 0.0
    p: float = 0.5
    samples: int = 1
    strategy: str = "ab"
    mask_scope: str = "batch"
    rescale: bool = False
    ensemble: int = 8
    test_ensemble: str = "auto"
    chunk_size: int | None = None
    epochs: float = 3.0
    max_steps: int = -1
    lr: float = 5e-4
    batch_size: int = 32
    max_seq_len: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    save_steps: int | None = None
    eval_steps: int | None = None
    holdout_fraction: float | None = None
    epoch_eval: bool = False
    skip_nonfinite_steps: bool = False
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    choice_scoring: str = "letter"
    report_to: str = "none"
    early_stopping_patience: int | None = None
    trainer_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    ood_task: str | Sequence[str] | None = None
    conformal_alpha: float | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.report_to, (list, tuple)):
            self.report_to = ",".join(str(r).strip() for r in self.report_to) or "none"
        if self.trainer_args is None:
            self.trainer_args = {}
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = ",".join(str(m).strip() for m in self.target_modules)
        self.ood_task = split_names(self.ood_task)
        checks = Checks()
        from ..tasks import trainable_task_names

        checks.choice("task", self.task, trainable_task_names())
        checks.text("output", self.output)
        checks.text("model", self.model, optional=True)
        checks.text("data_dir", self.data_dir, optional=True)
        checks.choice("method", self.method, METHODS)
        checks.integer("r", self.r, minimum=1)
        checks.number("alpha", self.alpha, positive=True)
        if self.target_modules is not None and not (
                isinstance(self.target_modules, str) and any(m.strip() for m in self.target_modules.split(","))):
            checks.add(f"target_modules must be module names (a comma-separated string or a list), got "
                       f"{self.target_modules!r}")
        for name in ("no_lora_dropout", "rescale", "resume", "overwrite", "epoch_eval", "skip_nonfinite_steps"):
            checks.boolean(name, getattr(self, name))
        _lora_dropout_checks(checks, self)
        checks.number("peft_dropout", self.peft_dropout, non_negative=True)
        if isinstance(self.peft_dropout, (int, float)) and self.peft_dropout >= 1:
            checks.add(f"peft_dropout must be in [0, 1), got {self.peft_dropout}")
        checks.choice("test_ensemble", self.test_ensemble, TEST_ENSEMBLES)
        checks.choice("choice_scoring", self.choice_scoring, CHOICE_SCORINGS)
        _acting_checks(checks, self)
        if self.test_ensemble in ("mc_dropout", "masks") and self.no_lora_dropout is False:
            checks.add(f"test_ensemble={self.test_ensemble!r} is a baseline's ensemble: it needs no_lora_dropout=True "
                       "(a LoRA Dropout model's ensemble is test_ensemble='auto')")
        if self.test_ensemble == "mc_dropout" and not (isinstance(self.peft_dropout, (int, float))
                                                       and self.peft_dropout > 0):
            checks.add("test_ensemble='mc_dropout' needs peft_dropout > 0 (the dropout kept on at test time)")
        if self.method == "adalora" and self.peft_dropout:
            checks.add("peft_dropout is a LoRA option; AdaLoRA runs take no PEFT dropout here")
        if self.holdout_fraction is not None:
            checks.number("holdout_fraction", self.holdout_fraction, positive=True)
            if isinstance(self.holdout_fraction, (int, float)) and not 0 < self.holdout_fraction < 1:
                checks.add(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        checks.number("epochs", self.epochs, non_negative=True)
        checks.integer("max_steps", self.max_steps)
        if not checks.problems and self.epochs <= 0 and self.max_steps <= 0:
            checks.add("give epochs > 0 or max_steps > 0")
        checks.number("lr", self.lr, positive=True)
        for name in ("batch_size", "max_seq_len"):
            checks.integer(name, getattr(self, name), minimum=1)
        for name in ("max_train_samples", "max_eval_samples", "save_steps", "eval_steps"):
            checks.integer(name, getattr(self, name), minimum=1, optional=True)
        checks.integer("seed", self.seed, minimum=0)
        if self.resume is True and self.overwrite is True:
            checks.add("resume and overwrite exclude each other")
        _trainer_checks(checks, self)
        checks.raise_if_any()

    @property
    def report_to_list(self) -> list[str]:
        """The logging integrations (``report_to``) as a list; empty for ``"none"``."""
        names = [r.strip() for r in str(self.report_to).split(",") if r.strip()]
        return [] if names in ([], ["none"]) else names

    def training_arguments(self) -> dict[str, Any]:
        """The TrainingArguments this run's training controls set (``--trainer-arg`` values last)."""
        out: dict[str, Any] = {
            "warmup_steps": self.warmup_ratio if self.warmup_ratio else self.warmup_steps,
            "lr_scheduler_type": self.lr_scheduler, "weight_decay": self.weight_decay,
            "gradient_accumulation_steps": self.gradient_accumulation_steps, "bf16": self.bf16, "fp16": self.fp16,
            "gradient_checkpointing": self.gradient_checkpointing, "report_to": self.report_to_list or "none"}
        if self.gradient_checkpointing:
            out["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        return {**out, **self.trainer_args}

    @property
    def target_module_list(self) -> list[str] | None:
        if self.target_modules is None:
            return None
        return [m.strip() for m in str(self.target_modules).split(",") if m.strip()]

    def lora_dropout_config(self) -> LoraDropoutConfig | None:
        """The LoRA Dropout config of the run, or None for the plain baseline."""
        return None if self.no_lora_dropout else _config_of(self)

    @property
    def ensemble_kind(self) -> str:
        """The test-time ensemble actually run: "lora_dropout", "mc_dropout", "masks" or "none"."""
        if self.ensemble == 0:
            return "none"
        if self.test_ensemble == "auto":
            return "none" if self.no_lora_dropout else "lora_dropout"
        return self.test_ensemble

    def resume_differences(self, stored: Mapping[str, Any]) -> list[str]:
        """Settings that differ from a stored record, as ``--name old -> new`` (empty when resuming is safe)."""
        now = self.to_dict()
        return [f"--{k.replace('_', '-')} {stored.get(k)!r} -> {now.get(k)!r}" for k in RESUME_KEYS
                if k in stored and stored.get(k) != now.get(k)]


@dataclass
class EvalSettings(SettingsBase):
    """Re-evaluation of a saved adapter. Unset values come from the run that wrote it (its ``metrics.json``)."""

    command = "eval"

    adapter: str | Path
    task: str | None = None
    data_dir: str | None = None
    model: str | None = None
    ensemble: int = 8
    chunk_size: int | None = None
    batch_size: int | None = None
    max_seq_len: int | None = None
    max_eval_samples: int | None = None
    seed: int | None = None
    output: str | Path | None = None
    ood_task: str | Sequence[str] | None = None
    conformal_alpha: float | None = None
    laplace: str | None = None  # Laplace-LoRA baseline (app/laplace_baseline.py): how its prior precision is tuned
    attn_implementation: str | None = None  # default: the run's
    choice_scoring: str | None = None  # default: the run's

    def __post_init__(self) -> None:
        self.ood_task = split_names(self.ood_task)
        checks = Checks()
        checks.text("adapter", self.adapter)
        _acting_checks(checks, self)
        if self.task is not None:
            from ..tasks import trainable_task_names

            checks.choice("task", self.task, trainable_task_names())
        for name in ("data_dir", "model", "output"):
            checks.text(name, getattr(self, name), optional=True)
        checks.integer("ensemble", self.ensemble, minimum=0)
        for name in ("chunk_size", "batch_size", "max_seq_len", "max_eval_samples"):
            checks.integer(name, getattr(self, name), minimum=1, optional=True)
        checks.integer("seed", self.seed, minimum=0, optional=True)
        if self.laplace is not None:
            checks.choice("laplace", self.laplace, LAPLACE_PRIORS)
        if self.attn_implementation is not None:
            checks.choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.choice_scoring is not None:
            checks.choice("choice_scoring", self.choice_scoring, CHOICE_SCORINGS)
        checks.raise_if_any()


@dataclass
class DemoSettings(SettingsBase):
    """The offline showcase: MiniLM on a small slice of the tweet corpus, trained long enough for plain LoRA to
    overfit, against LoRA Dropout (the same learning rate for both; ``eval_samples`` caps validation and test)."""

    command = "demo"

    output: str | Path = "runs/demo"
    train_samples: int = 300
    eval_samples: int = 200
    epochs: float = 10.0
    lr: float = 2e-3
    batch_size: int = 32
    max_seq_len: int = 48
    r: int = 8
    seed: int = 0
    overwrite: bool = False
    p: float = 0.5
    samples: int = 2
    strategy: str = "ab"
    mask_scope: str = "batch"
    rescale: bool = False
    ensemble: int = 8
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        checks = Checks()
        checks.text("output", self.output)
        for name in ("train_samples", "eval_samples", "batch_size", "max_seq_len", "r"):
            checks.integer(name, getattr(self, name), minimum=1)
        checks.number("epochs", self.epochs, positive=True)
        checks.number("lr", self.lr, positive=True)
        checks.integer("seed", self.seed, minimum=0)
        for name in ("overwrite", "rescale"):
            checks.boolean(name, getattr(self, name))
        _lora_dropout_checks(checks, self)
        checks.raise_if_any()

    def lora_dropout_config(self) -> LoraDropoutConfig:
        return _config_of(self)


__all__ = ["ATTN_IMPLEMENTATIONS", "CHOICE_SCORINGS", "LR_SCHEDULERS", "METHODS", "OWNED_TRAINER_ARGS", "RESUME_KEYS",
           "TEST_ENSEMBLES", "DemoSettings", "EvalSettings", "TrainSettings", "ood_task_choices",
           "training_argument_names"]
