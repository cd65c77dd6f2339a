"""SQuAD v1.1 / v2.0 extractive QA: loading the official JSON, the standard Hugging Face QA preprocessing
(sliding windows over the context), n-best span post-processing and the official EM/F1 metrics.

Loaded examples have the HF ``rajpurkar/squad`` schema: ``id, title, context, question, answers{text, answer_start}``.
When only the dev file is present (``shared/data`` has no train file), dev is split by **article** (title), so no
context appears in both splits: whole articles are shuffled with ``numpy.random.default_rng(seed)`` and taken for
validation until ``validation_fraction`` of the questions is reached. The metadata records this. With
``holdout_fraction`` (`loradrop.tasks.load_task_data`) that validation split becomes ``test`` and a validation split
for model selection is carved out of train, again by article (``group_column="title"``), so no context is in two
of the three splits.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value

from ..errors import DataError
from .base import (
    DEFAULT_VALIDATION_FRACTION,
    first_existing,
    make_dataset,
    read_text,
    require_columns,
    require_data_root,
    split_indices,
)
from .span import evaluate_span, prepare_span
from .spec import TaskSpec

SQUAD_FILES: dict[str, dict[str, Any]] = {
    "squad": {"train": "train-v1.1.json", "dev": "dev-v1.1.json", "subdirs": ("v1.1",), "version_2": False},
    "squad_v2": {"train": "train-v2.0.json", "dev": "dev-v2.0.json", "subdirs": ("v2.0", "v2"), "version_2": True},
}
SQUAD_FEATURES = Features({
    "id": Value("string"),
    "title": Value("string"),
    "context": Value("string"),
    "question": Value("string"),
    "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
})


# ----------------------------------------------------------------------------------------------------- loading


def read_squad_json(path: Path, *, version_2: bool) -> dict[str, list[Any]]:
    """Flatten a SQuAD JSON file into columns; v1.1 questions must have at least one answer."""
    try:
        payload = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise DataError(f"{path}: expected a SQuAD JSON object with a 'data' list of articles")
    cols: dict[str, list[Any]] = {k: [] for k in SQUAD_FEATURES}
    for a_i, article in enumerate(payload["data"]):
        title = article.get("title", f"article-{a_i}")
        for p_i, paragraph in enumerate(article.get("paragraphs", [])):
            if "context" not in paragraph or "qas" not in paragraph:
                raise DataError(f"{path}: data[{a_i}].paragraphs[{p_i}] lacks 'context' or 'qas'")
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                missing = [k for k in ("id", "question", "answers") if k not in qa]
                if missing:
                    raise DataError(f"{path}: question {qa.get('id', '?')!r} lacks {missing}")
                answers = [] if qa.get("is_impossible", False) else qa["answers"]
                if not answers and not version_2:
                    raise DataError(f"{path}: question {qa['id']!r} has no answer, which SQuAD v1.1 does not "
                                     "allow; use task 'squad_v2' for unanswerable questions")
                for ans in answers:
                    if "text" not in ans or "answer_start" not in ans:
                        raise DataError(f"{path}: question {qa['id']!r} has an answer without text/answer_start")
                cols["id"].append(str(qa["id"]))
                cols["title"].append(title)
                cols["context"].append(context)
                cols["question"].append(qa["question"])
                cols["answers"].append({"text": [a["text"] for a in answers],
                                        "answer_start": [int(a["answer_start"]) for a in answers]})
    return cols


def find_squad_files(task: str, data_dir: Path) -> tuple[Path | None, Path]:
    """(train file or None, dev file) for a folder (``<dir>``, ``<dir>/v1.1``, ``<dir>/squad/v1.1``...) or a file."""
    names = SQUAD_FILES[task]
    if data_dir.is_file():
        return None, data_dir
    folders = [data_dir]
    for sub in names["subdirs"]:
        folders += [data_dir / sub, data_dir / "squad" / sub]
    folders.append(data_dir / "squad")
    dev = first_existing([f / names["dev"] for f in folders])
    if dev is None:
        raise DataError(f"{task}: no {names['dev']} found; looked in {[str(f) for f in folders]}. Pass a SQuAD "
                         f"folder holding {names['dev']} (and optionally {names['train']}) or the JSON file itself")
    train = dev.parent / names["train"]
    return (train if train.is_file() else None), dev


def load_squad(
    spec: TaskSpec, data_dir: Path | None, *, seed: int = 0, validation_fraction: float | None = None
) -> tuple[DatasetDict, dict[str, Any]]:
    """Load SQuAD from local JSON; split dev by article when there is no train file."""
    data_dir = Path(data_dir) if data_dir is not None else require_data_root()
    if not data_dir.exists():
        raise DataError(f"{spec.name}: data_dir {data_dir} does not exist")
    version_2 = SQUAD_FILES[spec.name]["version_2"]
    train_file, dev_file = find_squad_files(spec.name, data_dir)
    dev = read_squad_json(dev_file, version_2=version_2)
    fraction = DEFAULT_VALIDATION_FRACTION if validation_fraction is None else validation_fraction
    notes = {}
    if train_file is not None:
        splits = {"train": make_dataset(read_squad_json(train_file, version_2=version_2), SQUAD_FEATURES),
                  "validation": make_dataset(dev, SQUAD_FEATURES)}
        notes = {"train": str(train_file), "validation": str(dev_file)}
    else:
        full = make_dataset(dev, SQUAD_FEATURES)
        keep, held = split_indices(len(full), fraction, seed, groups=dev["title"])
        splits = {"train": full.select(keep.tolist()), "validation": full.select(held.tolist())}
        n_val_articles = len(set(np.asarray(dev["title"], dtype=object)[held].tolist()))
        how = (f"no {SQUAD_FILES[spec.name]['train']}: {dev_file.name} split by article (title) with seed {seed}, "
               f"validation_fraction {fraction}: {len(keep)} / {len(held)} questions, "
               f"{len(set(dev['title'])) - n_val_articles} / {n_val_articles} articles")
        notes = {"train": how, "validation": how}
    metadata = {"source": str(dev_file.parent), "split_notes": notes, "dev_split": train_file is None}
    if train_file is None:
        metadata["derived_splits"] = f"train/validation split by article from {dev_file.name}"
    return DatasetDict(splits), metadata


# ----------------------------------------------------------------------------------------------- preprocessing


def _check_tokenizer(tokenizer: Any, max_seq_len: int, doc_stride: int) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("SQuAD preprocessing needs a fast tokenizer (offset mappings); got "
                         f"{type(tokenizer).__name__}")
    if not isinstance(max_seq_len, int) or max_seq_len < 16:
        raise DataError(f"max_seq_len must be an integer >= 16, got {max_seq_len!r}")
    if not isinstance(doc_stride, int) or not 0 <= doc_stride < max_seq_len:
        raise DataError(f"doc_stride must be an integer in [0, max_seq_len={max_seq_len}), got {doc_stride!r}")


def _tokenize_windows(examples: Mapping[str, list[Any]], tokenizer: Any, max_seq_len: int, doc_stride: int) -> Any:
    pad_on_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    return tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def prepare_squad_train_features(
    examples: Mapping[str, list[Any]], tokenizer: Any, max_seq_len: int = 384, doc_stride: int = 128
) -> dict[str, list[Any]]:
    """Batched map function: windows with ``start_positions``/``end_positions`` (CLS when the answer is outside)."""
    pad_on_right = tokenizer.padding_side == "right"
    tokenized = _tokenize_windows(examples, tokenizer, max_seq_len, doc_stride)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    context_id = 1 if pad_on_right else 0
    starts, ends = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start = 0
        while sequence_ids[token_start] != context_id:
            token_start += 1
        token_end = len(input_ids) - 1
        while sequence_ids[token_end] != context_id:
            token_end -= 1
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        while token_start < len(offsets) and offsets[token_start][0] <= start_char:
            token_start += 1
        starts.append(token_start - 1)
        while offsets[token_end][1] >= end_char:
            token_end -= 1
        ends.append(token_end + 1)
    tokenized["start_positions"] = starts
    tokenized["end_positions"] = ends
    return dict(tokenized)


def prepare_squad_eval_features(
    examples: Mapping[str, list[Any]], tokenizer: Any, max_seq_len: int = 384, doc_stride: int = 128
) -> dict[str, list[Any]]:
    """Batched map function: windows keeping ``example_id`` and ``offset_mapping`` (``None`` outside the context)."""
    pad_on_right = tokenizer.padding_side == "right"
    tokenized = _tokenize_windows(examples, tokenizer, max_seq_len, doc_stride)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    context_id = 1 if pad_on_right else 0
    example_ids = []
    for i in range(len(tokenized["input_ids"])):
        sequence_ids = tokenized.sequence_ids(i)
        example_ids.append(examples["id"][sample_mapping[i]])
        tokenized["offset_mapping"][i] = [
            (o if sequence_ids[k] == context_id else None) for k, o in enumerate(tokenized["offset_mapping"][i])
        ]
    tokenized["example_id"] = example_ids
    return dict(tokenized)


def preprocess_squad(
    spec: TaskSpec,
    dataset_dict: DatasetDict,
    tokenizer: Any,
    max_seq_len: int = 384,
    *,
    doc_stride: int = 128,
    num_proc: int | None = None,
    **_: Any,
) -> DatasetDict:
    """Standard HF QA preprocessing: the ``train`` split gets start/end positions; every other split becomes eval
    features with ``example_id`` and ``offset_mapping`` (for `postprocess_squad`)."""
    _check_tokenizer(tokenizer, max_seq_len, doc_stride)
    out = {}
    for split, dataset in dataset_dict.items():
        require_columns(dataset.column_names, ("id", "question", "context", "answers"), f"{spec.name} split {split!r}")
        fn = prepare_squad_train_features if split == "train" else prepare_squad_eval_features
        out[split] = dataset.map(fn, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                                 fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len,
                                            "doc_stride": doc_stride},
                                 desc=f"tokenize {spec.name}/{split}")
    return DatasetDict(out)


# ------------------------------------------------------------------------------------------------------ metrics


def normalize_answer(text: str) -> str:
    """Official SQuAD normalization: lowercase, drop punctuation, drop articles (a/an/the), collapse whitespace."""
    text = text.lower()
    exclude = set(string.punctuation)
    text = "".join(ch for ch in text if ch not in exclude)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalized strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str, *, version_2: bool = False) -> float:
    """Token-overlap F1 of the normalized strings (v2.0: two empty answers score 1)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _answer_texts(ref: Any) -> list[str]:
    if isinstance(ref, str):
        return [ref]
    if isinstance(ref, Mapping):
        if "answers" in ref:
            return _answer_texts(ref["answers"])
        if "text" in ref:
            return list(ref["text"])
        raise DataError(f"reference {ref!r} has neither 'answers' nor 'text'")
    return list(ref)


def _align(predictions: Any, references: Any) -> tuple[list[str], list[list[str]]]:
    """Pair predictions with reference answer lists (by id where ids are available)."""
    ref_ids: list[str] | None = None
    if isinstance(references, Dataset):
        ref_ids = list(references["id"])
        refs = [_answer_texts(a) for a in references["answers"]]
    elif isinstance(references, Mapping):
        ref_ids = [str(k) for k in references]
        refs = [_answer_texts(v) for v in references.values()]
    else:
        refs = []
        for r in references:
            refs.append(_answer_texts(r))
            if isinstance(r, Mapping) and "id" in r:
                ref_ids = (ref_ids or []) + [str(r["id"])]
        if ref_ids is not None and len(ref_ids) != len(refs):
            ref_ids = None
    if isinstance(predictions, Mapping):
        if ref_ids is None:
            raise DataError("predictions are keyed by id, so references need ids too (a mapping or dataset)")
        preds = [str(predictions.get(i, "")) for i in ref_ids]  # unanswered questions score 0 (official script)
    else:
        preds = [str(p) for p in predictions]
        if len(preds) != len(refs):
            raise DataError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        raise DataError("no references to score")
    return preds, refs


def squad_metrics(predictions: Any, references: Any, *, version_2: bool = False) -> dict[str, float]:
    """Official SQuAD exact match and F1, max over the reference answers, as fractions in [0, 1] like every other
    task's metrics (the official script prints percent: multiply by 100 to compare).

    ``predictions``: ``{id: text}`` or a sequence of texts. ``references``: ``{id: [answers]}``, a dataset or list of
    examples with ``answers``, or a sequence of answer lists. v1.1 requires at least one answer per question; v2.0
    treats an empty answer list as "no answer" (only ``""`` is right) and adds HasAns_/NoAns_ breakdowns.
    """
    preds, refs = _align(predictions, references)
    em, f1, has_ans = [], [], []
    for i, (pred, answers) in enumerate(zip(preds, refs)):
        answers = [a for a in answers if normalize_answer(a)] if version_2 else answers
        if not answers:
            if not version_2:
                raise DataError(f"reference {i} has no answer text; SQuAD v1.1 needs >= 1 (use squad_v2)")
            answers = [""]
        has_ans.append(answers != [""])
        em.append(max(exact_match_score(pred, a) for a in answers))
        f1.append(max(f1_score(pred, a, version_2=version_2) for a in answers))
    em_arr, f1_arr, has = np.asarray(em), np.asarray(f1), np.asarray(has_ans)
    result = {"exact_match": float(em_arr.mean()), "f1": float(f1_arr.mean())}
    if version_2:
        for name, mask in (("HasAns", has), ("NoAns", ~has)):
            if mask.any():
                result[f"{name}_exact_match"] = float(em_arr[mask].mean())
                result[f"{name}_f1"] = float(f1_arr[mask].mean())
            result[f"{name}_total"] = float(mask.sum())
    return result


def squad_task_metrics(spec: TaskSpec, predictions: Any, references: Any, **_: Any) -> dict[str, float]:
    """`squad_metrics` for a registry spec."""
    return squad_metrics(predictions, references, version_2=spec.name == "squad_v2")


TASK_SPECS: dict[str, TaskSpec] = {
    name: TaskSpec(
        name=name, family="squad", kind="span", num_labels=0, label_names=(), text_columns=("question", "context"),
        metric_names=("exact_match", "f1"), main_metric="f1", label_column="answers",
        hub_name=f"rajpurkar/{name}", description=desc, group_column="title",
        loader=load_squad, preprocessor=preprocess_squad, metrics=squad_task_metrics,
        prepare=prepare_span, evaluate=evaluate_span,
    )
    for name, desc in (("squad", "SQuAD v1.1 extractive QA"), ("squad_v2", "SQuAD v2.0 (with unanswerable)"))
}
