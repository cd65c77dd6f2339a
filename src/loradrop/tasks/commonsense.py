"""Commonsense multiple choice with a causal LM (the BLoB / Laplace-LoRA calibration protocol): ARC-Easy,
ARC-Challenge, OpenBookQA, BoolQ, WinoGrande-S/M and PIQA read from ``<data root>/commonsense`` (see its README),
and two evaluation-only sets in the same format, MMLU college_chemistry / college_physics (``mmlu_college_*``: the
OOD test sets of the protocol, with ARC-C / ARC-E, of a run trained on OpenBookQA with ``ood_task``).

Every example becomes one prompt that lists the question and its lettered choices and ends with ``"Answer:"``; the
model's next-token logits of the answer letters (``" A"``, ``" B"``...) at the last prompt position, softmaxed over
the letters the question has, are the class probabilities (`loradrop.tasks.commonsense_scoring`). Training is the
cross-entropy over those letters (not over the vocabulary).

Splits: ``train`` is the official train file and ``validation`` the official dev file; with ``holdout_fraction``
(the study) a validation split is carved out of train and the official dev file becomes ``test``. BoolQ has only its
dev set here: it is split once, with the fixed seed `BOOLQ_SPLIT_SEED` (the same test rows for every run seed, so
seeds can be ensembled), into train and validation (`BOOLQ_TEST_FRACTION` of the rows).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import DatasetDict, Features, List, Value

from ..errors import DataError
from .base import classification_metrics, make_dataset, read_text, require_data_root, split_indices
from .commonsense_scoring import (
    LETTERS,
    evaluate_choices,
    prepare_choices,
    preprocess_choices,
)
from .spec import TaskSpec

BOOLQ_SPLIT_SEED = 0
BOOLQ_TEST_FRACTION = 0.3
MMLU_SUBJECTS = {"mmlu_college_chemistry": "college_chemistry", "mmlu_college_physics": "college_physics"}
CHOICE_FEATURES = Features({"idx": Value("string"), "question": Value("string"), "context": Value("string"),
                            "choices": List(Value("string")), "label": Value("int64")})
ARC_FILES = {"arc_easy": ("arc/ARC-Easy", "ARC-Easy"), "arc_challenge": ("arc/ARC-Challenge", "ARC-Challenge")}
WINOGRANDE_TRAIN = {"winogrande_s": "train_s", "winogrande_m": "train_m"}


# ------------------------------------------------------------------------------------------------------ reading
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object a line; a bad line raises `DataError` naming the file and line."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_labels(path: Path, n: int) -> list[str]:
    """A ``.lst`` label file (one label a line), checked to have `n` lines."""
    labels = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if len(labels) != n:
        raise DataError(f"{path}: {len(labels)} labels for {n} examples")
    return labels


def parse_arc_row(row: dict[str, Any], where: str) -> tuple[str, str, list[str], int]:
    """(id, stem, choice texts, answer index) of an ARC / OpenBookQA row. The answer key is matched against the
    choices' own labels (``A``-``E`` or ``1``-``4``), so numeric keys and 3- or 5-choice questions are right."""
    try:
        question = row["question"]
        stem, choices, key = question["stem"], question["choices"], str(row["answerKey"]).strip()
        labels = [str(c["label"]).strip() for c in choices]
        texts = [str(c["text"]) for c in choices]
    except (KeyError, TypeError) as err:
        raise DataError(f"{where}: not an ARC/OpenBookQA row (missing {err})") from None
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    if not 2 <= len(texts) <= len(LETTERS):
        raise DataError(f"{where}: {len(texts)} choices; 2 to {len(LETTERS)} are supported")
    return str(row.get("id", where)), stem, texts, labels.index(key)


def _columns(rows: Sequence[tuple[str, str, list[str], int]], context: Sequence[str] | None = None
             ) -> dict[str, list[Any]]:
    return {"idx": [r[0] for r in rows], "question": [r[1] for r in rows],
            "context": list(context) if context is not None else ["" for _ in rows],
            "choices": [r[2] for r in rows], "label": [r[3] for r in rows]}


def commonsense_dir(data_dir: Path | None) -> Path:
    """The ``commonsense`` folder: `data_dir` itself or ``<data_dir>/commonsense`` (default: the data root's)."""
    root = Path(data_dir) if data_dir is not None else require_data_root()
    for candidate in (root / "commonsense", root):
        if any((candidate / sub).is_dir() for sub in ("arc", "openbookqa", "boolq", "winogrande", "piqa")):
            return candidate
    raise DataError(f"no commonsense data folder (with arc/, openbookqa/, boolq/, winogrande/, piqa/) in "
                    f"{[str(root / 'commonsense'), str(root)]}")


def _need(path: Path, task: str) -> Path:
    if not path.is_file():
        raise DataError(f"{task}: {path} does not exist (see the commonsense data README)")
    return path


def read_arc_file(path: Path, task: str) -> dict[str, list[Any]]:
    rows = [parse_arc_row(row, f"{path}:{i + 1}") for i, row in enumerate(read_jsonl(_need(path, task)))]
    return _columns(rows)


def read_boolq(path: Path, task: str) -> dict[str, list[Any]]:
    """BoolQ (SuperGLUE ``val.jsonl``): choices ``no`` / ``yes``; the leading ``"<title> -- "`` of the passage is
    removed, as in HF ``boolq`` (which BLoB loads)."""
    rows, context = [], []
    for i, row in enumerate(read_jsonl(_need(path, task))):
        label = row.get("label", row.get("answer"))
        if isinstance(label, str) and label.lower() in ("true", "false"):
            label = label.lower() == "true"
        if not isinstance(label, bool) or "question" not in row or "passage" not in row:
            raise DataError(f"{path}:{i + 1}: expected question, passage and a true/false label, got {sorted(row)}")
        passage = str(row["passage"])
        context.append(passage.split(" -- ", 1)[1] if " -- " in passage else passage)
        rows.append((str(row.get("idx", i)), str(row["question"]), ["no", "yes"], int(label)))
    return _columns(rows, context)


def read_winogrande(path: Path, task: str, labels_file: Path | None = None) -> dict[str, list[Any]]:
    """WinoGrande rows (``sentence, option1, option2, answer`` "1"/"2"); the rebuilt train files have no ``qID``
    (their ids are ``<file>-<row>``). A ``-labels.lst`` file beside them must agree with ``answer``."""
    raw = read_jsonl(_need(path, task))
    listed = read_labels(labels_file, len(raw)) if labels_file is not None and labels_file.is_file() else None
    rows = []
    for i, row in enumerate(raw):
        answer = str(row.get("answer", "")).strip()
        if answer not in ("1", "2") or not all(k in row for k in ("sentence", "option1", "option2")):
            raise DataError(f"{path}:{i + 1}: expected sentence, option1, option2 and answer '1'/'2', got "
                            f"answer {row.get('answer')!r} and fields {sorted(row)}")
        if listed is not None and listed[i] != answer:
            raise DataError(f"{path}:{i + 1}: answer {answer!r} disagrees with {labels_file.name} ({listed[i]!r})")
        rows.append((str(row.get("qID", f"{path.stem}-{i}")), str(row["sentence"]),
                     [str(row["option1"]), str(row["option2"])], int(answer) - 1))
    return _columns(rows)


def read_piqa(path: Path, labels_file: Path, task: str) -> dict[str, list[Any]]:
    """PIQA rows (``goal, sol1, sol2``) with their labels (0/1) from the ``-labels.lst`` file."""
    raw = read_jsonl(_need(path, task))
    labels = read_labels(_need(labels_file, task), len(raw))
    rows = []
    for i, (row, label) in enumerate(zip(raw, labels)):
        if label not in ("0", "1") or not all(k in row for k in ("goal", "sol1", "sol2")):
            raise DataError(f"{path}:{i + 1}: expected goal, sol1, sol2 and label 0/1, got label {label!r}")
        rows.append((f"{path.stem}-{i}", str(row["goal"]), [str(row["sol1"]), str(row["sol2"])], int(label)))
    return _columns(rows)


def read_mmlu_choices(data_dir: Path | None, subject: str) -> dict[str, list[Any]]:
    """An MMLU subject's test questions as 4-choice rows (scored with this module's prompt, not MMLU's)."""
    from .mmlu import find_mmlu_dir, read_mmlu_csv

    base = Path(data_dir) if data_dir is not None else None
    if base is not None and base.name == "commonsense":  # the commonsense folder itself: MMLU is beside it
        base = base.parent
    folder = find_mmlu_dir(base)
    path = _need(folder / "test" / f"{subject}_test.csv", f"mmlu {subject}")
    return _columns([(f"{subject}-{i}", q, list(c), a) for i, (q, c, a) in enumerate(read_mmlu_csv(path))])


# ------------------------------------------------------------------------------------------------------ loaders
def load_commonsense(spec: TaskSpec, data_dir: Path | None, *, seed: int = 0,
                     validation_fraction: float | None = None) -> tuple[DatasetDict, dict[str, Any]]:
    """Registry loader: train (official train file) and validation (official dev file); see the module docs."""
    name = spec.name
    if name in MMLU_SUBJECTS:  # an evaluation set only: no train split
        subject = MMLU_SUBJECTS[name]
        dev = make_dataset(read_mmlu_choices(data_dir, subject), CHOICE_FEATURES)
        return DatasetDict({"validation": dev}), {
            "source": str(data_dir) if data_dir is not None else "the data root",
            "split_notes": {"validation": f"MMLU {subject}_test.csv"}, "dev_split": False}
    root = commonsense_dir(data_dir)
    notes: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if name in ARC_FILES:
        folder, prefix = ARC_FILES[name]
        train = read_arc_file(root / folder / f"{prefix}-Train.jsonl", name)
        dev = read_arc_file(root / folder / f"{prefix}-Dev.jsonl", name)
        notes = {"train": f"{prefix}-Train.jsonl", "validation": f"{prefix}-Dev.jsonl"}
    elif name == "openbookqa":
        train = read_arc_file(root / "openbookqa" / "Main" / "train.jsonl", name)
        dev = read_arc_file(root / "openbookqa" / "Main" / "dev.jsonl", name)
        notes = {"train": "openbookqa/Main/train.jsonl", "validation": "openbookqa/Main/dev.jsonl"}
    elif name == "boolq":
        fraction = BOOLQ_TEST_FRACTION if validation_fraction is None else validation_fraction
        full = read_boolq(root / "boolq" / "val.jsonl", name)
        keep, held = split_indices(len(full["label"]), fraction, BOOLQ_SPLIT_SEED, strata=full["label"])
        train = {k: [v[i] for i in keep] for k, v in full.items()}
        dev = {k: [v[i] for i in held] for k, v in full.items()}
        how = (f"only BoolQ's dev set (val.jsonl, {len(full['label'])} rows) is here: split by the fixed seed "
               f"{BOOLQ_SPLIT_SEED} (every run seed gets the same split), stratified by label, into train "
               f"({len(keep)}) / validation ({len(held)}), fraction {fraction}")
        notes = {"train": how, "validation": how}
        extra = {"dev_split": True, "derived_splits": how}
    elif name in WINOGRANDE_TRAIN:
        wg = root / "winogrande"
        file = WINOGRANDE_TRAIN[name]
        train = read_winogrande(wg / f"{file}.jsonl", name, wg / f"{file}-labels.lst")
        dev = read_winogrande(wg / "dev.jsonl", name, wg / "dev-labels.lst")
        notes = {"train": f"winogrande/{file}.jsonl (rebuilt without qID)", "validation": "winogrande/dev.jsonl"}
    elif name == "piqa":
        train = read_piqa(root / "piqa" / "train.jsonl", root / "piqa" / "train-labels.lst", name)
        dev = read_piqa(root / "piqa" / "valid.jsonl", root / "piqa" / "valid-labels.lst", name)
        notes = {"train": "piqa/train.jsonl", "validation": "piqa/valid.jsonl"}
    else:  # pragma: no cover - every registered name is handled above
        raise DataError(f"no commonsense loader for task {name!r}")
    splits = DatasetDict({"train": make_dataset(train, CHOICE_FEATURES),
                          "validation": make_dataset(dev, CHOICE_FEATURES)})
    return splits, {"source": str(root), "split_notes": notes, "dev_split": False, **extra}


def _spec(name: str, num_labels: int, description: str, trainable: bool = True) -> TaskSpec:
    return TaskSpec(name=name, family="commonsense", kind="causal_lm", num_labels=num_labels,
                    label_names=LETTERS[:num_labels], text_columns=("question", "choices"),
                    metric_names=("accuracy",), main_metric="accuracy", label_column="label", hub_name=None,
                    trainable=trainable, predicts_classes=True, description=description, loader=load_commonsense,
                    preprocessor=preprocess_choices, metrics=classification_metrics, prepare=prepare_choices,
                    evaluate=evaluate_choices)


TASK_SPECS: dict[str, TaskSpec] = {
    "arc_easy": _spec("arc_easy", 5, "ARC-Easy (2251 train / 570 dev), lettered choices scored by a causal LM"),
    "arc_challenge": _spec("arc_challenge", 5, "ARC-Challenge (1119 train / 299 dev), scored by a causal LM"),
    "openbookqa": _spec("openbookqa", 4, "OpenBookQA main (4957 train / 500 dev), scored by a causal LM"),
    "boolq": _spec("boolq", 2, "BoolQ (dev only here: split with a fixed seed), no/yes as A/B"),
    "winogrande_s": _spec("winogrande_s", 2, "WinoGrande-S (640 train / 1267 dev), the two options as A/B"),
    "winogrande_m": _spec("winogrande_m", 2, "WinoGrande-M (2558 train / 1267 dev), the two options as A/B"),
    "piqa": _spec("piqa", 2, "PIQA (16113 train / 1838 valid), the two solutions as A/B"),
    **{name: _spec(name, 4, f"MMLU {subject} test, lettered choices scored by a causal LM; an evaluation set only "
                            "(an OOD test set: ood_task)", trainable=False) for name, subject in MMLU_SUBJECTS.items()},
}
