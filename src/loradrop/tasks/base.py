"""Shared pieces of the task layer: `TaskSpec`, data-dir resolution, TSV reading, deterministic splits, split
metadata, the hub fallback, and the generic classification/regression preprocessing and metrics."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Value

from ..errors import DataError, DataUnavailableError, UsageError
from ..pretrained import hub_offline
from .spec import TaskSpec

DATA_DIR_ENV = "LORADROP_DATA_DIR"
"""Environment variable naming the data root (the layout of ``shared/data``: ``glue/``, ``squad/``, ``mmlu/``...)."""
DEFAULT_VALIDATION_FRACTION = 0.2
"""Share of a dev set held out as validation when a task has no train file (QNLI, SQuAD here)."""
METADATA_MARKER = "[loradrop-metadata] "
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


# ----------------------------------------------------------------------------------------------- data locations


def find_data_root() -> Path | None:
    """The data root: ``$LORADROP_DATA_DIR``, else ``<repo>/../shared/data`` for a source checkout, else ``None``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    repo = Path(__file__).resolve().parents[3]
    if (repo / "pyproject.toml").is_file():
        path = repo.parent / "shared" / "data"
        if path.is_dir():
            return path
    return None


def require_data_root() -> Path:
    """`find_data_root` or a clear error."""
    root = find_data_root()
    if root is None:
        env = os.environ.get(DATA_DIR_ENV)
        where = f"${DATA_DIR_ENV}={env!r} is not a directory" if env else f"${DATA_DIR_ENV} is not set"
        raise DataError(
            f"No data directory: {where} and no shared/data folder next to the source checkout. "
            f"Pass data_dir (--data-dir) or set {DATA_DIR_ENV}."
        )
    return root


def is_hub_name(value: str | os.PathLike) -> bool:
    """True when ``value`` is not an existing local path and looks like a hub id (``"glue"``, ``"nyu-mll/glue"``)."""
    if not isinstance(value, str) or Path(value).expanduser().exists():
        return False
    return bool(_HUB_NAME.match(value)) and not value.startswith(".")


def first_existing(candidates: Sequence[Path]) -> Path | None:
    """The first candidate that exists."""
    for path in candidates:
        if path.exists():
            return path
    return None


# ----------------------------------------------------------------------------------------------------- reading


def read_text(path: Path, *, encoding: str = "utf-8") -> str:
    """A data file's text; a file that is not valid UTF-8 raises `DataError` naming the file, line and byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                        "save the file as UTF-8") from None


def read_tsv(
    path: Path, *, has_header: bool = True, fieldnames: Sequence[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Read a GLUE-style TSV (``QUOTE_NONE``, ``utf-8-sig``) and check that every row has the header's width.

    Returns (header, rows); rows exclude the header. ``fieldnames`` names the columns of a header-less file.
    """
    text = read_text(path, encoding="utf-8-sig")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if has_header:
        if not rows:
            raise DataError(f"{path} is empty (expected a header row)")
        header, rows = rows[0], rows[1:]
    else:
        if fieldnames is None:
            raise DataError("fieldnames is required when has_header=False")
        header = list(fieldnames)
    width = len(header)
    for lineno, row in enumerate(rows, start=2 if has_header else 1):
        if len(row) != width:
            raise DataError(f"{path}:{lineno}: expected {width} tab-separated fields ({header}), got {len(row)}")
    return header, rows


def require_columns(available: Sequence[str], required: Sequence[str], where: str) -> None:
    """ValueError naming the missing columns and the available ones."""
    missing = [c for c in required if c not in available]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; available columns: {list(available)}")


def parse_label(raw: str, label_map: Mapping[str, int], where: str) -> int:
    """Map a raw label string to its id, or ValueError naming the value and the allowed ones."""
    try:
        return label_map[raw.strip()]
    except KeyError:
        raise DataError(f"{where}: label {raw!r} is not one of {sorted(label_map)}") from None


# ------------------------------------------------------------------------------------------------- splitting


def split_indices(
    n: int,
    fraction: float,
    seed: int,
    *,
    strata: Sequence[Any] | None = None,
    groups: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (kept, held-out) row indices, both sorted.

    Rows of one group (e.g. one SQuAD article, one duplicated tweet) always land on the same side. For each stratum
    (label; a group belongs to its majority label) about ``round(fraction * rows with that label)`` rows go to the
    held-out side: groups are visited in shuffled order and taken while they do not overshoot that target (so very
    large groups stay on the kept side); at least one group is held out and one kept per stratum with two or more
    groups. Uses ``numpy.random.default_rng(seed)``, so the split depends only on the inputs and the seed.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation/test fraction must be in (0, 1), got {fraction!r}")
    if n < 2:
        raise DataError(f"cannot split {n} row(s) into two non-empty parts")
    if groups is None:
        group_of_row = np.arange(n)
        first_row = np.arange(n)
    else:
        if len(groups) != n:
            raise DataError(f"groups has {len(groups)} entries for {n} rows")
        _, first_row, group_of_row = np.unique(np.asarray(groups, dtype=object).astype(str), return_index=True,
                                               return_inverse=True)
        group_of_row = group_of_row.reshape(-1)
    n_groups = len(first_row)
    if strata is None:
        stratum_of_row = np.zeros(n, dtype=np.int64)
    else:
        if len(strata) != n:
            raise DataError(f"strata has {len(strata)} entries for {n} rows")
        _, stratum_of_row = np.unique(np.asarray(strata, dtype=object).astype(str), return_inverse=True)
        stratum_of_row = stratum_of_row.reshape(-1)
    counts = np.zeros((n_groups, int(stratum_of_row.max()) + 1), dtype=np.int64)
    np.add.at(counts, (group_of_row, stratum_of_row), 1)
    stratum_of_group = counts.argmax(axis=1)  # a group's stratum is its majority label
    own = counts[np.arange(n_groups), stratum_of_group]
    rng = np.random.default_rng(seed)
    held_group = np.zeros(n_groups, dtype=bool)
    for stratum in range(counts.shape[1]):
        members = np.flatnonzero(stratum_of_group == stratum)
        if len(members) < 2:
            continue
        members = members[rng.permutation(len(members))]
        target = round(fraction * int(counts[:, stratum].sum()))
        taken, chosen = 0, []
        for group in members:  # shuffled order; groups that would overshoot the target are skipped
            if taken >= target or len(chosen) >= len(members) - 1:
                break
            if taken + int(own[group]) <= target:
                chosen.append(group)
                taken += int(own[group])
        if not chosen:
            chosen = [members[int(np.argmin(own[members]))]]
        held_group[chosen] = True
    held = held_group[group_of_row]
    return np.flatnonzero(~held), np.flatnonzero(held)


def subsample(dataset: Dataset, max_samples: int | None, seed: int, what: str) -> Dataset:
    """A seeded random subset of ``max_samples`` rows in original order (the dataset itself when it is smaller)."""
    if max_samples is None:
        return dataset
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise DataError(f"{what} must be None or a positive integer, got {max_samples!r}")
    if max_samples >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    return dataset.select(np.sort(rng.choice(len(dataset), size=max_samples, replace=False)).tolist())


# -------------------------------------------------------------------------------------------------- building


def make_dataset(columns: Mapping[str, list[Any]], features: Features) -> Dataset:
    """An in-memory `Dataset` with explicit features (no cache files are written)."""
    return Dataset.from_dict(dict(columns), info=DatasetInfo(features=features))


def check_not_empty(dataset_dict: DatasetDict, task: str, source: str) -> None:
    """ValueError for any split with no rows."""
    for split, dataset in dataset_dict.items():
        if len(dataset) == 0:
            raise DataError(f"{task}: split {split!r} loaded from {source} is empty")


def attach_metadata(dataset_dict: DatasetDict, metadata: Mapping[str, Any]) -> DatasetDict:
    """Record ``metadata`` (a JSON-able dict) in every split's ``info.description``; read it with `get_metadata`."""
    summary = metadata.get("summary", "")
    text = f"{summary}\n{METADATA_MARKER}{json.dumps(dict(metadata), sort_keys=True, default=str)}"
    for dataset in dataset_dict.values():
        dataset.info.description = text
    return dataset_dict


def get_metadata(data: Dataset | DatasetDict) -> dict[str, Any]:
    """The metadata dict that `load_task_data` stored (source files, how splits were made, row counts)."""
    dataset = next(iter(data.values())) if isinstance(data, DatasetDict) else data
    description = dataset.info.description or ""
    if METADATA_MARKER not in description:
        return {}
    return json.loads(description.split(METADATA_MARKER, 1)[1])


# ------------------------------------------------------------------------------------------------------- hub


def load_hub_dataset(name: str, config: str | None, task: str) -> DatasetDict:
    """``datasets.load_dataset(name, config)``, turning offline/connection failures into `DataUnavailableError`."""
    hint = (f"task {task!r}: {name!r} is not a local path, so it was taken as a Hugging Face hub dataset, "
            "but the hub cannot be reached")
    if hub_offline():
        raise DataUnavailableError(f"{hint} (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set). "
                                   "Pass a local --data-dir (data_dir=...) instead.")
    import datasets

    try:
        loaded = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise DataUnavailableError(f"{hint} ({type(exc).__name__}: {exc}). "
                                   "Pass a local --data-dir (data_dir=...) instead.") from exc
    except Exception as exc:  # datasets' own "not found" errors when offline or misnamed
        if type(exc).__name__ in {"DatasetNotFoundError", "DataFilesNotFoundError", "LocalEntryNotFoundError"}:
            raise DataUnavailableError(f"{hint} ({type(exc).__name__}: {exc}). "
                                       "Pass a local --data-dir (data_dir=...) instead.") from exc
        raise
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({"train": loaded})
    return loaded


def normalize_hub_splits(
    spec: TaskSpec, loaded: DatasetDict, name: str, *, seed: int, validation_fraction: float
) -> tuple[DatasetDict, dict[str, Any]]:
    """Hub splits -> train/validation(+extras): drop unlabeled GLUE test splits, rename MNLI's matched dev, split
    train when there is no validation split, and check the expected columns."""
    out: dict[str, Dataset] = {}
    notes: dict[str, str] = {}
    for split, dataset in loaded.items():
        if spec.label_column and spec.label_column in dataset.column_names and spec.kind == "classification":
            labels = np.asarray(list(dataset[spec.label_column]))
            if len(labels) and (labels < 0).all():
                notes[split] = "dropped: unlabeled (label -1)"
                continue
        target = {"validation_matched": "validation"}.get(split, split)
        out[target] = dataset
    if "train" not in out:
        raise DataError(f"hub dataset {name!r} has no 'train' split; splits: {list(loaded)}")
    for split, dataset in out.items():
        required = [*spec.text_columns, *([spec.label_column] if spec.label_column else [])]
        require_columns(dataset.column_names, required, f"hub dataset {name!r} split {split!r}")
    if "validation" not in out:
        strata = list(out["train"][spec.label_column]) if spec.kind == "classification" else None
        keep, held = split_indices(len(out["train"]), validation_fraction, seed, strata=strata)
        out["validation"] = out["train"].select(held.tolist())
        out["train"] = out["train"].select(keep.tolist())
        notes["validation"] = f"held out from hub train (fraction {validation_fraction}, seed {seed})"
    ordered = {k: out[k] for k in ["train", "validation", *sorted(set(out) - {"train", "validation"})]}
    return DatasetDict(ordered), {"source": f"hub:{name}", "split_notes": notes}


# ---------------------------------------------------------------------------- classification / regression


def label_dtype(spec: TaskSpec) -> str:
    """``"float32"`` for regression, else ``"int64"``."""
    return "float32" if spec.kind == "regression" else "int64"


def tokenize_classification(
    spec: TaskSpec,
    dataset_dict: DatasetDict,
    tokenizer: Any,
    max_seq_len: int,
    *,
    padding: bool | str = False,
    num_proc: int | None = None,
) -> DatasetDict:
    """Tokenize one or two text columns (``truncation=True``) and keep only model inputs plus ``labels``."""
    if not isinstance(max_seq_len, int) or max_seq_len < 8:
        raise DataError(f"max_seq_len must be an integer >= 8, got {max_seq_len!r}")
    columns = list(spec.text_columns)

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = tokenizer(*[batch[c] for c in columns], truncation=True, max_length=max_seq_len, padding=padding)
        encoded = dict(encoded)
        encoded["labels"] = batch[spec.label_column]
        return encoded

    out = {}
    for split, dataset in dataset_dict.items():
        require_columns(dataset.column_names, [*columns, spec.label_column], f"{spec.name} split {split!r}")
        mapped = dataset.map(encode, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                             desc=f"tokenize {spec.name}/{split}")
        out[split] = mapped.cast_column("labels", Value(label_dtype(spec)))
    return DatasetDict(out)


def as_class_predictions(predictions: Any, num_labels: int, what: str = "predictions") -> np.ndarray:
    """Class ids from ids or from (n, num_labels) logits/probabilities (argmax)."""
    preds = np.asarray(predictions)
    if preds.ndim == 2:
        if preds.shape[1] != num_labels:
            raise DataError(f"{what} has shape {preds.shape}; expected (n, {num_labels}) scores or (n,) class ids")
        preds = preds.argmax(axis=-1)
    if preds.ndim != 1:
        raise DataError(f"{what} must be class ids (n,) or scores (n, {num_labels}), got shape {preds.shape}")
    if preds.size and np.issubdtype(preds.dtype, np.floating) and not np.all(np.equal(np.mod(preds, 1), 0)):
        raise DataError(f"{what} are non-integer floats; pass class ids or (n, {num_labels}) scores")
    return preds.astype(np.int64)


def classification_metrics(spec: TaskSpec, predictions: Any, references: Any) -> dict[str, float]:
    """The metrics in ``spec.metric_names`` (accuracy, f1, f1_macro, matthews_correlation, pearson, spearman)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    refs = np.asarray(references)
    if refs.ndim != 1 or refs.size == 0:
        raise DataError(f"{spec.name}: references must be a non-empty 1-D sequence, got shape {refs.shape}")
    if spec.kind == "regression":
        preds = np.asarray(predictions, dtype=np.float64)
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.shape != refs.shape:
            raise DataError(f"{spec.name}: predictions shape {preds.shape} != references shape {refs.shape}")
        refs = refs.astype(np.float64)
        if len(refs) < 2:
            raise DataError(f"{spec.name}: correlations need at least 2 examples, got {len(refs)}")
        result = {"pearson": float(pearsonr(preds, refs)[0]), "spearman": float(spearmanr(preds, refs)[0])}
        return {k: result[k] for k in spec.metric_names}
    preds = as_class_predictions(predictions, spec.num_labels)
    refs = as_class_predictions(refs, spec.num_labels, "references")
    if preds.shape != refs.shape:
        raise DataError(f"{spec.name}: {len(preds)} predictions for {len(refs)} references")
    for what, values in (("predictions", preds), ("references", refs)):
        bad = sorted(set(np.unique(values).tolist()) - set(range(spec.num_labels)))
        if bad:
            raise DataError(f"{spec.name}: {what} contain label id(s) {bad}; allowed: 0..{spec.num_labels - 1} "
                             f"({list(spec.label_names)})")
    labels = list(range(spec.num_labels))
    result: dict[str, float] = {}
    for name in spec.metric_names:
        if name == "accuracy":
            result[name] = float(accuracy_score(refs, preds))
        elif name == "f1":
            result[name] = float(f1_score(refs, preds, average="binary", pos_label=1, zero_division=0.0))
        elif name == "f1_macro":
            result[name] = float(f1_score(refs, preds, average="macro", labels=labels, zero_division=0.0))
        elif name == "matthews_correlation":
            result[name] = float(matthews_corrcoef(refs, preds))
        else:  # pragma: no cover - guarded by the registry
            raise DataError(f"{spec.name}: unknown metric {name!r}")
    return result


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> list[int]:
    """Token ids of ``" A"``, ``" B"``...: the answers a causal LM scores after ``"Answer:"`` (MMLU, the commonsense
    tasks); each must be a single, distinct token."""
    ids = []
    for letter in letters:
        tokens = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise UsageError(f"the tokenizer splits the answer {letter!r} into {len(tokens)} tokens; letter scoring "
                             "needs single-token answers (use a causal LM tokenizer such as SmolLM2's)")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise UsageError(f"the tokenizer maps the answers {list(letters)} to repeated ids {ids}")
    return ids
