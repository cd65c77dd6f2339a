"""GLUE tasks (CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE) from the original GLUE TSV files.

Columns, label ids and label names follow the Hugging Face ``nyu-mll/glue`` dataset, so models trained on either
source agree. Files are read with ``csv.QUOTE_NONE`` and ``utf-8-sig`` (sentences hold unbalanced quotes; MRPC starts
with a BOM). GLUE test labels are not public, so only train and dev are loaded; dev is the ``validation`` split.
When a task folder has no ``train.tsv`` (QNLI in ``shared/data``), dev is split into train/validation with
`split_indices` (stratified by label, ``seed``, ``validation_fraction``), and the metadata says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import ClassLabel, DatasetDict, Features, Value

from ..errors import DataError
from .base import (
    DEFAULT_VALIDATION_FRACTION,
    classification_metrics,
    make_dataset,
    parse_label,
    read_tsv,
    require_columns,
    require_data_root,
    split_indices,
    tokenize_classification,
)
from .classification import evaluate_classification, prepare_classification
from .spec import TaskSpec

GLUE_TASK_NAMES: tuple[str, ...] = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
BINARY = {"0": 0, "1": 1}
NLI2 = {"entailment": 0, "not_entailment": 1}


@dataclass(frozen=True)
class GlueLayout:
    """One on-disk layout of a GLUE task folder.

    ``columns`` maps our (HF) column names to the file's columns; ``train``/``validation``/``extra`` list the files
    concatenated into each split (``train=None`` or a missing train file: split the dev set).
    """

    folder: str
    validation: tuple[str, ...]
    columns: Mapping[str, str]
    label: str
    train: tuple[str, ...] | None = ("train.tsv",)
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fieldnames: tuple[str, ...] | None = None
    note: str = ""


LAYOUTS: dict[str, tuple[GlueLayout, ...]] = {
    "cola": (
        GlueLayout("CoLA", ("dev.tsv",), {"sentence": "sentence"}, "label",
                   fieldnames=("source", "label", "original_label", "sentence")),
        GlueLayout("CoLA-tokenized", ("test_idd.tsv", "test_ood.tsv"), {"sentence": "x"}, "y",
                   note="CoLA-tokenized: lowercased, tokenized text without the final period (not the original "
                        "CoLA text); validation = in-domain dev (test_idd) + out-of-domain dev (test_ood)"),
    ),
    "sst2": (GlueLayout("SST-2", ("dev.tsv",), {"sentence": "sentence"}, "label"),),
    "mrpc": (GlueLayout("MRPC", ("dev.tsv",), {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),),
    "qqp": (GlueLayout("QQP", ("dev.tsv",), {"question1": "question1", "question2": "question2"}, "is_duplicate"),),
    "stsb": (GlueLayout("STS-B", ("dev.tsv",), {"sentence1": "sentence1", "sentence2": "sentence2"}, "score"),),
    "mnli": (GlueLayout("MNLI", ("dev_matched.tsv",), {"premise": "sentence1", "hypothesis": "sentence2"},
                        "gold_label", extra={"validation_mismatched": ("dev_mismatched.tsv",)}),),
    "qnli": (GlueLayout("QNLI", ("dev.tsv",), {"question": "question", "sentence": "sentence"}, "label"),),
    "rte": (GlueLayout("RTE", ("dev.tsv",), {"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),),
}

LABEL_MAPS: dict[str, dict[str, int] | None] = {
    "cola": BINARY, "sst2": BINARY, "mrpc": BINARY, "qqp": BINARY, "stsb": None,
    "mnli": {"entailment": 0, "neutral": 1, "contradiction": 2}, "qnli": NLI2, "rte": NLI2,
}
STSB_RANGE = (0.0, 5.0)


def find_glue_folder(task: str, data_dir: Path) -> tuple[Path, GlueLayout]:
    """The task folder and its layout: ``<dir>/<Task>/``, ``<dir>/glue/<Task>/``, or ``<dir>`` itself."""
    layouts = LAYOUTS[task]
    tried = []
    for layout in layouts:
        for candidate in (data_dir / layout.folder, data_dir / "glue" / layout.folder):
            tried.append(candidate)
            if all((candidate / f).is_file() for f in layout.validation):
                return candidate, layout
    for layout in layouts:
        if all((data_dir / f).is_file() for f in layout.validation):
            return data_dir, layout
    expected = " or ".join(f"{lay.folder}/{{{','.join((*(lay.train or ()), *lay.validation))}}}" for lay in layouts)
    raise DataError(
        f"{task}: {data_dir} is not a GLUE data folder for this task: expected {expected} under it (or under "
        f"its glue/ subfolder); looked in {[str(p) for p in tried]}"
    )


def _read_split(task: str, folder: Path, layout: GlueLayout, files: tuple[str, ...]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [] for name in layout.columns}
    columns["label"] = []
    label_map = LABEL_MAPS[task]
    for file_name in files:
        path = folder / file_name
        header, rows = read_tsv(path, has_header=layout.fieldnames is None, fieldnames=layout.fieldnames)
        require_columns(header, [*layout.columns.values(), layout.label], str(path))
        position = {name: header.index(raw) for name, raw in layout.columns.items()}
        label_at = header.index(layout.label)
        first_line = 1 if layout.fieldnames else 2
        for lineno, row in enumerate(rows, start=first_line):
            where = f"{path}:{lineno}"
            for name, at in position.items():
                columns[name].append(row[at])
            raw = row[label_at]
            if label_map is None:
                try:
                    score = float(raw)
                except ValueError:
                    raise DataError(f"{where}: score {raw!r} is not a number in {list(STSB_RANGE)}") from None
                if not STSB_RANGE[0] <= score <= STSB_RANGE[1]:
                    raise DataError(f"{where}: score {score} is outside the allowed range {list(STSB_RANGE)}")
                columns["label"].append(score)
            else:
                columns["label"].append(parse_label(raw, label_map, where))
    columns["idx"] = list(range(len(columns["label"])))
    return columns


def glue_features(spec: TaskSpec) -> Features:
    """Features of a loaded GLUE split (HF column names)."""
    layout = LAYOUTS[spec.name][0]
    feats: dict[str, Any] = {name: Value("string") for name in layout.columns}
    feats["label"] = Value("float32") if spec.kind == "regression" else ClassLabel(names=list(spec.label_names))
    feats["idx"] = Value("int32")
    return Features(feats)


def load_glue(
    spec: TaskSpec, data_dir: Path | None, *, seed: int = 0, validation_fraction: float | None = None
) -> tuple[DatasetDict, dict[str, Any]]:
    """Load one GLUE task from local TSVs into train / validation (+ MNLI's validation_mismatched)."""
    data_dir = Path(data_dir) if data_dir is not None else require_data_root()
    if not data_dir.is_dir():
        raise DataError(f"{spec.name}: data_dir {data_dir} is not a directory (expected a GLUE folder)")
    folder, layout = find_glue_folder(spec.name, data_dir)
    features = glue_features(spec)
    fraction = DEFAULT_VALIDATION_FRACTION if validation_fraction is None else validation_fraction
    splits = {}
    notes: dict[str, str] = {}
    dev = _read_split(spec.name, folder, layout, layout.validation)
    train_files = layout.train if layout.train and all((folder / f).is_file() for f in layout.train) else None
    if train_files:
        splits["train"] = make_dataset(_read_split(spec.name, folder, layout, train_files), features)
        splits["validation"] = make_dataset(dev, features)
        notes["train"] = "+".join(train_files)
        notes["validation"] = "+".join(layout.validation)
    else:
        strata = dev["label"] if spec.kind == "classification" else None
        keep, held = split_indices(len(dev["label"]), fraction, seed, strata=strata)
        full = make_dataset(dev, features)
        splits["train"] = full.select(keep.tolist())
        splits["validation"] = full.select(held.tolist())
        how = (f"no train file in {folder}: {'+'.join(layout.validation)} split by seed {seed} into "
               f"train ({len(keep)}) / validation ({len(held)}), validation_fraction {fraction}"
               f"{', stratified by label' if strata is not None else ''}")
        notes["train"] = notes["validation"] = how
    for split, files in layout.extra.items():
        if all((folder / f).is_file() for f in files):
            splits[split] = make_dataset(_read_split(spec.name, folder, layout, files), features)
            notes[split] = "+".join(files)
    metadata = {"source": str(folder), "layout": layout.folder, "split_notes": notes,
                "dev_split": train_files is None}
    if train_files is None:
        metadata["derived_splits"] = f"train/validation split from {'+'.join(layout.validation)}"
    if layout.note:
        metadata["note"] = layout.note
    return DatasetDict(splits), metadata


def preprocess_glue(spec: TaskSpec, dataset_dict: DatasetDict, tokenizer: Any, max_seq_len: int,
                    **kwargs: Any) -> DatasetDict:
    """Tokenize (sentence or sentence pair) -> input_ids, attention_mask, (token_type_ids), labels."""
    return tokenize_classification(spec, dataset_dict, tokenizer, max_seq_len, **kwargs)


def glue_metrics(spec: TaskSpec, predictions: Any, references: Any, **_: Any) -> dict[str, float]:
    """Official GLUE metrics: MCC (CoLA), Pearson/Spearman (STS-B), accuracy+F1 (MRPC, QQP), accuracy (others)."""
    return classification_metrics(spec, predictions, references)


def _spec(name: str, kind: str, labels: tuple[str, ...], metrics: tuple[str, ...], main: str, desc: str) -> TaskSpec:
    return TaskSpec(
        name=name, family="glue", kind=kind, num_labels=len(labels) if labels else 1, label_names=labels,
        text_columns=tuple(LAYOUTS[name][0].columns), metric_names=metrics, main_metric=main, label_column="label",
        hub_name="nyu-mll/glue", description=desc,
        loader=load_glue, preprocessor=preprocess_glue, metrics=glue_metrics,
        prepare=prepare_classification, evaluate=evaluate_classification,
    )


TASK_SPECS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        _spec("cola", "classification", ("unacceptable", "acceptable"), ("matthews_correlation",),
              "matthews_correlation", "CoLA grammatical acceptability"),
        _spec("sst2", "classification", ("negative", "positive"), ("accuracy",), "accuracy", "SST-2 sentiment"),
        _spec("mrpc", "classification", ("not_equivalent", "equivalent"), ("accuracy", "f1"), "accuracy",
              "MRPC paraphrase"),
        _spec("qqp", "classification", ("not_duplicate", "duplicate"), ("accuracy", "f1"), "accuracy",
              "QQP duplicate questions"),
        _spec("stsb", "regression", (), ("pearson", "spearman"), "pearson", "STS-B similarity score 0-5"),
        _spec("mnli", "classification", ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
              "MultiNLI (validation = matched dev; validation_mismatched when present)"),
        _spec("qnli", "classification", ("entailment", "not_entailment"), ("accuracy",), "accuracy",
              "QNLI question/sentence entailment"),
        _spec("rte", "classification", ("entailment", "not_entailment"), ("accuracy",), "accuracy",
              "RTE textual entailment"),
    )
}
