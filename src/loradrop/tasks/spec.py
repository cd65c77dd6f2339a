"""The task contract: `TaskSpec` (what a task is and the functions that load, prepare and evaluate it), `TaskData`
(a task made ready for one run) and `EvalResult` (what a task's evaluation returns).

Adding a task is one module that builds a `TaskSpec` with these functions, plus one entry in the registry
(`loradrop.tasks.TASKS`); the application layer never switches on task kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS: tuple[str, ...] = ("classification", "regression", "span", "causal_lm")
# how a multiple-choice task is scored by a causal LM: the answer letter's next token (`commonsense_scoring`), or each
# choice's log-likelihood summed over its tokens or their mean (`cloze_scoring`)
CHOICE_SCORINGS: tuple[str, ...] = ("letter", "cloze", "cloze_mean")


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one task and the functions that load, preprocess, prepare, evaluate and score it.

    Attributes:
        name: registry key, e.g. ``"rte"``.
        family: module that implements it: ``"glue"``, ``"squad"``, ``"instruct"``, ``"mmlu"`` or ``"tweets"``.
        kind: one of `KINDS` (picks the model head: see `loradrop.pretrained.KINDS`).
        num_labels: classes (1 for regression, 0 for span / generation tasks, 4 for MMLU choices).
        label_names: class names in id order (empty where there are no classes).
        text_columns: input text columns in the order they are fed to the tokenizer.
        metric_names: keys `compute_metrics` returns (the official metrics first).
        main_metric: the metric used for model selection.
        label_column: target column of the loaded (untokenized) data, or ``None``.
        hub_name: default hub dataset when ``data_dir`` names a hub dataset of this family.
        trainable: whether ``loradrop train`` can fine-tune on it (MMLU is an evaluation set only).
        predicts_classes: its ``evaluate`` scores ``num_labels`` classes like a classification task (probability
            rows, the ``split`` / ``mc_dropout`` / ``progress`` options, a label-stratified held-out validation split)
            although its model head is of another kind (multiple choice scored by a causal LM).
        group_column: a column of the loaded data whose rows must stay on one side of a split held out of train
            (``holdout_fraction``), e.g. SQuAD's ``title``: no article (so no context) is in two splits.
        loader: ``loader(spec, data_dir, *, seed, validation_fraction) -> (DatasetDict, metadata)``.
        preprocessor: ``preprocessor(spec, dataset_dict, tokenizer, max_seq_len, **kwargs) -> DatasetDict``.
        metrics: ``metrics(spec, predictions, references, **kwargs) -> dict``.
        prepare: ``prepare(spec, raw, tokenizer, *, max_seq_len, need_train, data_dir, seed, max_eval_samples)
            -> TaskData``: everything a training or evaluation run needs from the data side.
        evaluate: ``evaluate(model, data, tokenizer, *, batch_size, ensemble, chunk_size, seed) -> EvalResult``:
            single-pass and ensemble metrics plus one prediction row per example.
    """

    name: str
    family: str
    kind: str
    num_labels: int
    label_names: tuple[str, ...]
    text_columns: tuple[str, ...]
    metric_names: tuple[str, ...]
    main_metric: str
    label_column: str | None = "label"
    hub_name: str | None = None
    trainable: bool = True
    predicts_classes: bool = False
    group_column: str | None = None
    description: str = ""
    loader: Callable[..., tuple[Any, dict[str, Any]]] | None = field(default=None, repr=False, compare=False)
    preprocessor: Callable[..., Any] | None = field(default=None, repr=False, compare=False)
    metrics: Callable[..., dict[str, float]] | None = field(default=None, repr=False, compare=False)
    prepare: Callable[..., TaskData] | None = field(default=None, repr=False, compare=False)
    evaluate: Callable[..., EvalResult] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TaskSpec {self.name!r}: kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.main_metric not in self.metric_names:
            raise ValueError(f"TaskSpec {self.name!r}: main_metric {self.main_metric!r} not in {self.metric_names}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"TaskSpec {self.name!r}: {len(self.label_names)} label names for {self.num_labels}")

    @property
    def classifies(self) -> bool:
        """Whether its evaluation scores classes (a classification task, or `predicts_classes`)."""
        return self.kind == "classification" or self.predicts_classes

    @property
    def scores_splits(self) -> bool:
        """Whether its ``evaluate`` scores any prepared split (``split=``), so a run can hold a validation split out
        of train (``holdout_fraction``), score it at the end and after every epoch (``epoch_eval``)."""
        return self.kind in ("classification", "regression", "span") or self.predicts_classes

    @property
    def label2id(self) -> dict[str, int]:
        """Class name -> id (for a model config)."""
        return {name: i for i, name in enumerate(self.label_names)}


@dataclass
class TaskData:
    """A task made ready for one run by its ``prepare`` function."""

    spec: TaskSpec
    raw: Any  # DatasetDict as loaded (subsampled)
    train: Any  # tokenized train set, or None for an evaluation-only run
    eval_loss: Any  # tokenized set for the Trainer's evaluation loss (or None)
    eval_split: str  # what the final metrics are computed on (a split of `raw`, or e.g. "mmlu:test")
    collator: Any
    metadata: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)  # what the task's evaluate needs (encoded eval set...)
    recorded: dict[str, Any] = field(default_factory=dict)  # preparation settings to record (e.g. doc_stride)
    compute_loss_func: Callable[..., Any] | None = None  # the Trainer's compute_loss_func, when not the model's loss


@dataclass
class EvalResult:
    """Metrics of the single pass and of the ensemble (None without one), and one prediction row per example."""

    single: dict[str, Any]
    ensemble: dict[str, Any] | None
    rows: list[dict[str, Any]]
