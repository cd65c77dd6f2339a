"""Instruction data for causal-LM SFT (Alpaca format: ``instruction, input, output`` and optional ``history``) and
MMLU evaluation data (hendrycks CSVs, the standard "The following are multiple choice questions..." prompts).

SFT examples are formatted with the Stanford Alpaca template; the response is followed by the EOS token and the
labels are ``-100`` on every prompt token, so the loss covers the response only. Alpaca files have no validation
split: one is held out with `split_indices` (``seed``, ``validation_fraction``, default 0.1), recorded in the
metadata.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value

from .base import TaskSpec, first_existing, make_dataset, require_data_root, split_indices

IGNORE_INDEX = -100
INSTRUCT_VALIDATION_FRACTION = 0.1
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_FEATURES = Features({
    "instruction": Value("string"),
    "input": Value("string"),
    "output": Value("string"),
    "history": List(List(Value("string"))),
})
DEFAULT_FILES: dict[str, tuple[str, ...]] = {
    "alpaca": ("alpaca_en_demo.json", "alpaca_data.json", "alpaca_data_cleaned.json", "alpaca.json"),
    "lima": ("lima.json",),
}
MMLU_CHOICES: tuple[str, ...] = ("A", "B", "C", "D")
MMLU_SPLITS: dict[str, str] = {"dev": "dev", "val": "val", "validation": "val", "test": "test"}


# ---------------------------------------------------------------------------------------------- Alpaca / SFT


def format_alpaca_prompt(instruction: str, input: str = "", history: Sequence[Sequence[str]] = ()) -> str:
    """The Alpaca prompt up to and including ``"### Response:\\n"``; earlier turns (``history``: [instruction,
    response] pairs) come first as completed Instruction/Response blocks."""
    header = ALPACA_HEADER_INPUT if input else ALPACA_HEADER_NO_INPUT
    turns = "".join(f"### Instruction:\n{q}\n\n### Response:\n{a}\n\n" for q, a in history)
    body = f"### Instruction:\n{instruction}\n\n"
    if input:
        body += f"### Input:\n{input}\n\n"
    return f"{header}{turns}{body}### Response:\n"


def read_alpaca_json(path: Path) -> dict[str, list[Any]]:
    """Read an Alpaca-format ``.json`` list (or ``.jsonl``) into columns, validating every record."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        records = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else json.loads(text))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{instruction, input, output}} records, "
                         f"got {type(records).__name__}")
    cols: dict[str, list[Any]] = {k: [] for k in ALPACA_FEATURES}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
        missing = [k for k in ("instruction", "output") if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing}; Alpaca records need instruction and output "
                             f"(input, history optional); it has {sorted(rec)}")
        for key in ("instruction", "input", "output"):
            if not isinstance(rec.get(key, ""), str):
                raise ValueError(f"{path}: record {i} field {key!r} must be a string, got {type(rec[key]).__name__}")
        history = rec.get("history") or []
        if not all(isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t)
                   for t in history):
            raise ValueError(f"{path}: record {i} 'history' must be a list of [instruction, response] pairs")
        if not rec["output"]:
            raise ValueError(f"{path}: record {i} has an empty output")
        cols["instruction"].append(rec["instruction"])
        cols["input"].append(rec.get("input") or "")
        cols["output"].append(rec["output"])
        cols["history"].append([list(t) for t in history])
    return cols


def find_alpaca_file(task: str, data_dir: Path) -> Path:
    """The JSON file itself, or the task's default file name in ``<dir>`` / ``<dir>/instruction/llamafactory``."""
    if data_dir.is_file():
        return data_dir
    folders = [data_dir, data_dir / "llamafactory", data_dir / "instruction" / "llamafactory"]
    found = first_existing([folder / name for folder in folders for name in DEFAULT_FILES[task]])
    if found is None:
        raise ValueError(f"{task}: no Alpaca-format file {list(DEFAULT_FILES[task])} in "
                         f"{[str(f) for f in folders]}; pass the .json file itself as data_dir")
    return found


def load_instruct(
    spec: TaskSpec, data_dir: Path | None, *, seed: int = 0, validation_fraction: float | None = None
) -> tuple[DatasetDict, dict[str, Any]]:
    """Load an Alpaca-format file and hold out a seeded validation split."""
    data_dir = Path(data_dir) if data_dir is not None else require_data_root()
    if not data_dir.exists():
        raise ValueError(f"{spec.name}: data_dir {data_dir} does not exist")
    path = find_alpaca_file(spec.name, data_dir)
    cols = read_alpaca_json(path)
    fraction = INSTRUCT_VALIDATION_FRACTION if validation_fraction is None else validation_fraction
    full = make_dataset(cols, ALPACA_FEATURES)
    if len(full) == 0:
        raise ValueError(f"{spec.name}: {path} holds no records")
    keep, held = split_indices(len(full), fraction, seed)
    how = f"{path.name} split by seed {seed}, validation_fraction {fraction}: {len(keep)} / {len(held)}"
    return (DatasetDict({"train": full.select(keep.tolist()), "validation": full.select(held.tolist())}),
            {"source": str(path), "split_notes": {"train": how, "validation": how}, "dev_split": False,
             "derived_splits": f"validation held out of {path.name}"})


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize_sft(
    examples: Mapping[str, list[Any]], tokenizer: Any, max_seq_len: int, *, add_eos: bool = True
) -> dict[str, list[list[int]]]:
    """Batched map function: prompt + response ids (BOS when the tokenizer adds one, EOS after the response),
    truncated to ``max_seq_len``, labels ``-100`` on the prompt."""
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    eos = [eos_id] if add_eos and eos_id is not None else []
    histories = examples.get("history") or [[] for _ in examples["instruction"]]
    inputs = examples.get("input") or ["" for _ in examples["instruction"]]
    prompts = [format_alpaca_prompt(i, x, h) for i, x, h in zip(examples["instruction"], inputs, histories)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(examples["output"]), add_special_tokens=False)["input_ids"]
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for p, r in zip(prompt_ids, response_ids):
        prompt = bos + p
        ids = (prompt + r + eos)[:max_seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + r + eos)[:max_seq_len]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def preprocess_instruct(
    spec: TaskSpec,
    dataset_dict: DatasetDict,
    tokenizer: Any,
    max_seq_len: int,
    *,
    num_proc: int | None = None,
    drop_fully_masked: bool = True,
    **_: Any,
) -> DatasetDict:
    """SFT tokenization (`tokenize_sft`); examples whose response was truncated away entirely (all labels -100)
    are dropped unless ``drop_fully_masked=False``. Pad with ``DataCollatorForSeq2Seq`` (labels padded with -100)."""
    if not isinstance(max_seq_len, int) or max_seq_len < 8:
        raise ValueError(f"max_seq_len must be an integer >= 8, got {max_seq_len!r}")
    out = {}
    for split, dataset in dataset_dict.items():
        missing = [c for c in ("instruction", "output") if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{spec.name} split {split!r}: missing column(s) {missing}; "
                             f"available: {dataset.column_names}")
        mapped = dataset.map(tokenize_sft, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                             fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len},
                             desc=f"tokenize {spec.name}/{split}")
        if drop_fully_masked:
            mapped = mapped.filter(lambda labels: any(t != IGNORE_INDEX for t in labels), input_columns="labels")
        out[split] = mapped
    return DatasetDict(out)


def causal_lm_metrics(spec: TaskSpec, predictions: Any, references: Any, **_: Any) -> dict[str, float]:
    """Token-level loss, perplexity and accuracy of next-token ``predictions`` (logits, (n, T, V)) against
    ``references`` (labels, (n, T), -100 ignored), with the usual one-position shift."""
    logits = np.asarray(predictions, dtype=np.float64)
    labels = np.asarray(references)
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"{spec.name}: expected logits (n, T, V) and labels (n, T), got {logits.shape} and "
                         f"{labels.shape}")
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    if not mask.any():
        raise ValueError(f"{spec.name}: every label is {IGNORE_INDEX}; nothing to score")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    safe = np.where(mask, labels, 0)
    nll = -np.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    loss = float(nll[mask].mean())
    accuracy = float((logits.argmax(-1) == labels)[mask].mean())
    return {"loss": loss, "perplexity": float(np.exp(loss)), "token_accuracy": accuracy}


# ------------------------------------------------------------------------------------------------------- MMLU


def find_mmlu_dir(data_dir: Path | None) -> Path:
    """The folder holding MMLU's ``dev/``, ``val/``, ``test/`` (``<dir>``, ``<dir>/data`` or ``<dir>/mmlu/data``)."""
    data_dir = Path(data_dir) if data_dir is not None else require_data_root()
    candidates = [data_dir, data_dir / "data", data_dir / "mmlu" / "data", data_dir / "mmlu"]
    for candidate in candidates:
        if (candidate / "test").is_dir() or (candidate / "dev").is_dir():
            return candidate
    raise ValueError(f"mmlu: no MMLU folder (with dev/, val/, test/ of <subject>_<split>.csv) in "
                     f"{[str(c) for c in candidates]}")


def mmlu_subjects(data_dir: Path | None = None, split: str = "test") -> list[str]:
    """Sorted subject names, from the CSV file names of ``split``."""
    folder = find_mmlu_dir(data_dir) / _mmlu_split(split)
    suffix = f"_{_mmlu_split(split)}.csv"
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def _mmlu_split(split: str) -> str:
    if split not in MMLU_SPLITS:
        raise ValueError(f"mmlu split must be one of {list(MMLU_SPLITS)}, got {split!r}")
    return MMLU_SPLITS[split]


def read_mmlu_csv(path: Path) -> list[tuple[str, list[str], int]]:
    """Rows of a header-less MMLU CSV as (question, [A, B, C, D], answer index)."""
    rows = []
    with open(path, encoding="utf-8", newline="") as handle:
        for lineno, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 6:
                raise ValueError(f"{path}:{lineno}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
            answer = row[5].strip()
            if answer not in MMLU_CHOICES:
                raise ValueError(f"{path}:{lineno}: answer {answer!r} is not one of {list(MMLU_CHOICES)}")
            rows.append((row[0], row[1:5], MMLU_CHOICES.index(answer)))
    return rows


def format_subject(subject: str) -> str:
    """``"high_school_physics"`` -> ``"high school physics"``."""
    return " ".join(subject.split("_"))


def format_mmlu_example(question: str, choices: Sequence[str], answer: int | None = None) -> str:
    """One question block: question, ``A. ...`` to ``D. ...``, ``Answer:`` (plus `` X\\n\\n`` for a shot)."""
    text = question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(MMLU_CHOICES, choices))
    text += "\nAnswer:"
    if answer is not None:
        text += f" {MMLU_CHOICES[answer]}\n\n"
    return text


def mmlu_prompt(subject: str, question: str, choices: Sequence[str],
                shots: Sequence[tuple[str, Sequence[str], int]] = ()) -> str:
    """The standard (Hendrycks et al.) MMLU prompt: header, ``k`` answered dev examples, then the question."""
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(format_mmlu_example(q, c, a) for q, c, a in shots) + format_mmlu_example(question, choices)


def load_mmlu(
    data_dir: str | Path | None = None, split: str = "test", subjects: Sequence[str] | None = None, k_shot: int = 0
) -> Dataset:
    """MMLU questions with ready prompts.

    Columns: ``subject, question, choices (4), answer (0-3), answer_letter, prompt``. ``prompt`` ends with
    ``"Answer:"``; score the continuations ``" A"`` .. ``" D"``. ``k_shot`` (0-5) answered examples come from the
    subject's ``dev`` file, in file order (the standard protocol). ``split``: ``dev``, ``val``/``validation``, ``test``.
    """
    folder = find_mmlu_dir(Path(data_dir) if data_dir is not None else None)
    file_split = _mmlu_split(split)
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or not 0 <= k_shot <= 5:
        raise ValueError(f"k_shot must be an integer in 0..5 (the dev set has 5 examples per subject), got {k_shot!r}")
    if k_shot and file_split == "dev":
        raise ValueError("k_shot > 0 draws the shots from the dev split, so split='dev' needs k_shot=0")
    available = mmlu_subjects(folder, file_split)
    if not available:
        raise ValueError(f"mmlu: no *_{file_split}.csv files in {folder / file_split}")
    if subjects is None:
        chosen = available
    else:
        chosen = [subjects] if isinstance(subjects, str) else list(subjects)
        bad = [s for s in chosen if s not in available]
        if bad or not chosen:
            raise ValueError(f"unknown MMLU subject(s) {bad or chosen}; allowed: {available}")
    cols: dict[str, list[Any]] = {k: [] for k in ("subject", "question", "choices", "answer", "answer_letter",
                                                  "prompt")}
    for subject in chosen:
        shots = read_mmlu_csv(folder / "dev" / f"{subject}_dev.csv")[:k_shot] if k_shot else []
        if len(shots) < k_shot:
            raise ValueError(f"mmlu: {subject}_dev.csv has {len(shots)} examples, fewer than k_shot={k_shot}")
        rows = read_mmlu_csv(folder / file_split / f"{subject}_{file_split}.csv")
        if not rows:
            raise ValueError(f"mmlu: {folder / file_split / f'{subject}_{file_split}.csv'} is empty")
        for question, choices, answer in rows:
            cols["subject"].append(subject)
            cols["question"].append(question)
            cols["choices"].append(choices)
            cols["answer"].append(answer)
            cols["answer_letter"].append(MMLU_CHOICES[answer])
            cols["prompt"].append(mmlu_prompt(subject, question, choices, shots))
    features = Features({"subject": Value("string"), "question": Value("string"), "choices": List(Value("string")),
                         "answer": Value("int64"), "answer_letter": Value("string"), "prompt": Value("string")})
    return make_dataset(cols, features)


def load_mmlu_task(
    spec: TaskSpec, data_dir: Path | None, *, seed: int = 0, validation_fraction: float | None = None
) -> tuple[DatasetDict, dict[str, Any]]:
    """Registry loader: train = dev (0-shot prompts, the few-shot pool), validation = val and test = test, both
    5-shot (the standard protocol). Use `load_mmlu` for other settings."""
    folder = find_mmlu_dir(data_dir)
    splits = DatasetDict({"train": load_mmlu(folder, "dev", k_shot=0),
                          "validation": load_mmlu(folder, "val", k_shot=5),
                          "test": load_mmlu(folder, "test", k_shot=5)})
    notes = {"train": "dev CSVs, 0-shot prompts", "validation": "val CSVs, 5-shot prompts from dev",
             "test": "test CSVs, 5-shot prompts from dev"}
    return splits, {"source": str(folder), "split_notes": notes, "dev_split": False}


def preprocess_mmlu(spec: TaskSpec, dataset_dict: DatasetDict, tokenizer: Any, max_seq_len: int, **_: Any
                    ) -> DatasetDict:
    """Tokenize prompts (left-truncated so the question and ``Answer:`` survive) keeping ``answer`` and ``subject``.
    There is no ``labels`` column: MMLU is scored by comparing the choice letters' log-likelihoods."""
    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        ids = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
        ids = [seq[-max_seq_len:] for seq in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]}

    out = {}
    for split, dataset in dataset_dict.items():
        missing = [c for c in ("prompt", "answer", "subject") if c not in dataset.column_names]
        if missing:
            raise ValueError(f"mmlu split {split!r}: missing column(s) {missing}; available: {dataset.column_names}")
        drop = [c for c in dataset.column_names if c not in ("answer", "subject")]
        out[split] = dataset.map(encode, batched=True, remove_columns=drop, desc=f"tokenize mmlu/{split}")
    return DatasetDict(out)


def _as_choice_ids(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 2:
        if arr.shape[1] != len(MMLU_CHOICES):
            raise ValueError(f"{what}: scores must have {len(MMLU_CHOICES)} columns, got shape {arr.shape}")
        return arr.argmax(-1)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be letters, indices or (n, 4) scores; got shape {arr.shape}")
    out = []
    for v in arr.tolist():
        if isinstance(v, str) and v.strip().upper() in MMLU_CHOICES:
            out.append(MMLU_CHOICES.index(v.strip().upper()))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < len(MMLU_CHOICES):
            out.append(int(v))
        else:
            raise ValueError(f"{what}: {v!r} is not one of {list(MMLU_CHOICES)} or 0..3")
    return np.asarray(out, dtype=np.int64)


def mmlu_metrics(predictions: Any, references: Any, subjects: Sequence[str] | None = None) -> dict[str, float]:
    """MMLU accuracy: micro (``accuracy``, all questions), macro over subjects (``accuracy_macro``) and
    ``accuracy_<subject>`` per subject. ``references``: the `load_mmlu` dataset (or rows with ``answer`` and
    ``subject``), or answers plus ``subjects``."""
    if isinstance(references, Dataset) or (
        isinstance(references, Sequence) and references and isinstance(references[0], Mapping)
    ):
        rows = references
        answers = [r["answer"] for r in rows] if not isinstance(rows, Dataset) else list(rows["answer"])
        if subjects is None:
            subjects = [r["subject"] for r in rows] if not isinstance(rows, Dataset) else list(rows["subject"])
        references = answers
    refs = _as_choice_ids(references, "references")
    preds = _as_choice_ids(predictions, "predictions")
    if len(preds) != len(refs) or len(refs) == 0:
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    subjects = ["all"] * len(refs) if subjects is None else list(subjects)
    if len(subjects) != len(refs):
        raise ValueError(f"{len(subjects)} subjects for {len(refs)} references")
    correct = preds == refs
    subj = np.asarray(subjects, dtype=object)
    per_subject = {s: float(correct[subj == s].mean()) for s in sorted(set(subjects))}
    result = {"accuracy": float(correct.mean()), "accuracy_macro": float(np.mean(list(per_subject.values())))}
    result.update({f"accuracy_{s}": v for s, v in per_subject.items()})
    return result


def mmlu_task_metrics(spec: TaskSpec, predictions: Any, references: Any, subjects: Sequence[str] | None = None,
                      **_: Any) -> dict[str, float]:
    """`mmlu_metrics` for a registry spec."""
    return mmlu_metrics(predictions, references, subjects)


TASK_SPECS: dict[str, TaskSpec] = {
    "alpaca": TaskSpec(
        name="alpaca", family="instruct", kind="causal_lm", num_labels=0, label_names=(),
        text_columns=("instruction", "input"), metric_names=("loss", "perplexity", "token_accuracy"),
        main_metric="loss", label_column="output", hub_name="tatsu-lab/alpaca",
        description="Alpaca-format instruction SFT (default: LLaMA-Factory's 1k alpaca_en_demo.json)",
        loader=load_instruct, preprocessor=preprocess_instruct, metrics=causal_lm_metrics,
    ),
    "lima": TaskSpec(
        name="lima", family="instruct", kind="causal_lm", num_labels=0, label_names=(),
        text_columns=("instruction", "input"), metric_names=("loss", "perplexity", "token_accuracy"),
        main_metric="loss", label_column="output", hub_name=None,
        description="LIMA (1029 examples) in Alpaca format with multi-turn history",
        loader=load_instruct, preprocessor=preprocess_instruct, metrics=causal_lm_metrics,
    ),
    "mmlu": TaskSpec(
        name="mmlu", family="instruct", kind="causal_lm", num_labels=4, label_names=MMLU_CHOICES,
        text_columns=("prompt",), metric_names=("accuracy", "accuracy_macro"), main_metric="accuracy",
        label_column="answer", hub_name=None,
        description="MMLU 57-subject multiple choice, scored by the choice letters' likelihood",
        loader=load_mmlu_task, preprocessor=preprocess_mmlu, metrics=mmlu_task_metrics,
    ),
}
