"""MMLU (Hendrycks et al.): the 57-subject multiple-choice test read from the original CSVs, the standard prompts
("The following are multiple choice questions (with answers) about ..."), accuracy per subject, and the evaluation
of a causal LM by scoring the answer letters' next-token probabilities (single pass and batched ensemble).

MMLU is an evaluation set: instruction-tuned runs (`loradrop.tasks.instruct`) are scored on it 0-shot and 5-shot.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value

from ..calibration import classification_calibration
from ..errors import DataError
from .base import (
    find_data_root,
    letter_token_ids,
    make_dataset,
    read_text,
    require_columns,
    require_data_root,
    subsample,
)
from .classification import CALIBRATION_METRICS, class_prediction_fields
from .mmlu_scoring import estimate_line, score_choices
from .spec import CHOICE_SCORINGS, EvalResult, TaskSpec

MMLU_CHOICES: tuple[str, ...] = ("A", "B", "C", "D")
MMLU_SPLITS: dict[str, str] = {"dev": "dev", "val": "val", "validation": "val", "test": "test"}
MMLU_SHOTS = (0, 5)
MMLU_MAX_LEN = 2048
# Without --max-eval-samples, instruct runs score this many seeded test questions per subject (57 subjects: 114
# questions per shot setting) instead of all 14,042; pass --max-eval-samples 14042 for the full test set.
MMLU_DEFAULT_QUESTIONS_PER_SUBJECT = 2

def find_mmlu_dir(data_dir: Path | None) -> Path:
    """The folder holding MMLU's ``dev/``, ``val/``, ``test/`` (``<dir>``, ``<dir>/data`` or ``<dir>/mmlu/data``)."""
    data_dir = Path(data_dir) if data_dir is not None else require_data_root()
    candidates = [data_dir, data_dir / "data", data_dir / "mmlu" / "data", data_dir / "mmlu"]
    for candidate in candidates:
        if (candidate / "test").is_dir() or (candidate / "dev").is_dir():
            return candidate
    raise DataError(f"mmlu: no MMLU folder (with dev/, val/, test/ of <subject>_<split>.csv) in "
                     f"{[str(c) for c in candidates]}")


def mmlu_subjects(data_dir: Path | None = None, split: str = "test") -> list[str]:
    """Sorted subject names, from the CSV file names of ``split``."""
    folder = find_mmlu_dir(data_dir) / _mmlu_split(split)
    suffix = f"_{_mmlu_split(split)}.csv"
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def _mmlu_split(split: str) -> str:
    if split not in MMLU_SPLITS:
        raise DataError(f"mmlu split must be one of {list(MMLU_SPLITS)}, got {split!r}")
    return MMLU_SPLITS[split]


def read_mmlu_csv(path: Path) -> list[tuple[str, list[str], int]]:
    """Rows of a header-less MMLU CSV as (question, [A, B, C, D], answer index)."""
    rows = []
    for lineno, row in enumerate(csv.reader(io.StringIO(read_text(path), newline="")), start=1):
        if len(row) != 6:
            raise DataError(f"{path}:{lineno}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
        answer = row[5].strip()
        if answer not in MMLU_CHOICES:
            raise DataError(f"{path}:{lineno}: answer {answer!r} is not one of {list(MMLU_CHOICES)}")
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


def mmlu_cloze_prompt(subject: str, question: str, shots: Sequence[tuple[str, Sequence[str], int]] = ()) -> str:
    """MMLU in cloze form (the "CF" of OLMES, Gu et al. 2024, and lm-evaluation-harness's cloze variants): no lettered
    list; ``k`` shots answered with their answer's text, then ``"Question: ...\nAnswer:"``, after which each choice's
    text `` <choice>`` is scored. Small models that cannot bind answers to letters show what they know this way."""
    header = f"The following are questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(f"Question: {q}\nAnswer: {str(c[a]).strip()}\n\n" for q, c, a in shots) + \
        f"Question: {question}\nAnswer:"


def load_mmlu(
    data_dir: str | Path | None = None, split: str = "test", subjects: Sequence[str] | None = None, k_shot: int = 0,
    cloze: bool = False,
) -> Dataset:
    """MMLU questions with ready prompts.

    Columns: ``subject, question, choices (4), answer (0-3), answer_letter, prompt``. ``prompt`` ends with
    ``"Answer:"``; score the continuations ``" A"`` .. ``" D"`` (with `cloze`, `mmlu_cloze_prompt`: the choices'
    texts). ``k_shot`` (0-5) answered examples come from the subject's ``dev`` file, in file order (the standard
    protocol). ``split``: ``dev``, ``val``/``validation``, ``test``.
    """
    folder = find_mmlu_dir(Path(data_dir) if data_dir is not None else None)
    file_split = _mmlu_split(split)
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or not 0 <= k_shot <= 5:
        raise DataError(f"k_shot must be an integer in 0..5 (the dev set has 5 examples per subject), got {k_shot!r}")
    if k_shot and file_split == "dev":
        raise DataError("k_shot > 0 draws the shots from the dev split, so split='dev' needs k_shot=0")
    available = mmlu_subjects(folder, file_split)
    if not available:
        raise DataError(f"mmlu: no *_{file_split}.csv files in {folder / file_split}")
    if subjects is None:
        chosen = available
    else:
        chosen = [subjects] if isinstance(subjects, str) else list(subjects)
        bad = [s for s in chosen if s not in available]
        if bad or not chosen:
            raise DataError(f"unknown MMLU subject(s) {bad or chosen}; allowed: {available}")
    cols: dict[str, list[Any]] = {k: [] for k in ("subject", "question", "choices", "answer", "answer_letter",
                                                  "prompt")}
    for subject in chosen:
        shots = read_mmlu_csv(folder / "dev" / f"{subject}_dev.csv")[:k_shot] if k_shot else []
        if len(shots) < k_shot:
            raise DataError(f"mmlu: {subject}_dev.csv has {len(shots)} examples, fewer than k_shot={k_shot}")
        rows = read_mmlu_csv(folder / file_split / f"{subject}_{file_split}.csv")
        if not rows:
            raise DataError(f"mmlu: {folder / file_split / f'{subject}_{file_split}.csv'} is empty")
        for question, choices, answer in rows:
            cols["subject"].append(subject)
            cols["question"].append(question)
            cols["choices"].append(choices)
            cols["answer"].append(answer)
            cols["answer_letter"].append(MMLU_CHOICES[answer])
            cols["prompt"].append(mmlu_cloze_prompt(subject, question, shots) if cloze
                                  else mmlu_prompt(subject, question, choices, shots))
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
        require_columns(dataset.column_names, ("prompt", "answer", "subject"), f"mmlu split {split!r}")
        drop = [c for c in dataset.column_names if c not in ("answer", "subject")]
        out[split] = dataset.map(encode, batched=True, remove_columns=drop, desc=f"tokenize mmlu/{split}")
    return DatasetDict(out)


def _as_choice_ids(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 2:
        if arr.shape[1] != len(MMLU_CHOICES):
            raise DataError(f"{what}: scores must have {len(MMLU_CHOICES)} columns, got shape {arr.shape}")
        return arr.argmax(-1)
    if arr.ndim != 1:
        raise DataError(f"{what} must be letters, indices or (n, 4) scores; got shape {arr.shape}")
    out = []
    for v in arr.tolist():
        if isinstance(v, str) and v.strip().upper() in MMLU_CHOICES:
            out.append(MMLU_CHOICES.index(v.strip().upper()))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < len(MMLU_CHOICES):
            out.append(int(v))
        else:
            raise DataError(f"{what}: {v!r} is not one of {list(MMLU_CHOICES)} or 0..3")
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
        raise DataError(f"{len(preds)} predictions for {len(refs)} references")
    subjects = ["all"] * len(refs) if subjects is None else list(subjects)
    if len(subjects) != len(refs):
        raise DataError(f"{len(subjects)} subjects for {len(refs)} references")
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


# ------------------------------------------------------------------------------------------------ evaluation
def load_mmlu_eval(data_dir: str | None, max_eval_samples: int | None, seed: int,
                   metadata: dict[str, Any], scoring: str = "letter") -> dict[int, Dataset]:
    """MMLU test questions for every shot count in `MMLU_SHOTS` (the same subsample for each), located in
    `data_dir` or the data root, with the prompts `scoring` needs (``letter``, or ``cloze`` / ``cloze_mean``:
    `mmlu_cloze_prompt`); recorded in ``metadata["mmlu"]``."""
    candidates = [Path(data_dir)] if data_dir is not None and Path(data_dir).is_dir() else []
    root = find_data_root()
    if root is not None:
        candidates.append(root)
    folder = None
    for candidate in candidates:
        try:
            folder = find_mmlu_dir(candidate)
            break
        except ValueError:
            continue
    if folder is None:
        raise DataError(f"instruct: MMLU evaluation data (mmlu/data/{{dev,test}}/*.csv) not found in "
                        f"{[str(c) for c in candidates]}; put it under --data-dir or set LORADROP_DATA_DIR")
    sets = {}
    for shots in MMLU_SHOTS:
        full = load_mmlu(folder, "test", k_shot=shots, cloze=scoring != "letter")
        if max_eval_samples is None:
            sets[shots] = default_subset(full, MMLU_DEFAULT_QUESTIONS_PER_SUBJECT, seed)
        else:
            sets[shots] = subsample(full, max_eval_samples, seed, "max_eval_samples")
    if max_eval_samples is None:
        subset = (f"default: {MMLU_DEFAULT_QUESTIONS_PER_SUBJECT} seeded questions per subject "
                  "(MMLU_DEFAULT_QUESTIONS_PER_SUBJECT); --max-eval-samples N for another size, 14042 for all")
    elif max_eval_samples >= len(full):
        subset = "all test questions"
    else:
        subset = f"--max-eval-samples {max_eval_samples}: a seeded random subset of all subjects' questions"
    metadata["mmlu"] = {"source": str(folder), "split": "test", "k_shot": list(MMLU_SHOTS),
                        "questions": len(sets[0]), "questions_before_subsampling": len(full),
                        "subjects": len(set(sets[0]["subject"])), "seed": seed, "subset": subset,
                        "shots_from": "the first k rows of each subject's dev CSV", "scoring": scoring}
    if max_eval_samples is None:
        sys.stderr.write(f"MMLU: scoring the default subset, {len(sets[0])} of {len(full)} test questions "
                         f"({MMLU_DEFAULT_QUESTIONS_PER_SUBJECT} per subject, seed {seed}) 0-shot and 5-shot; "
                         "--max-eval-samples 14042 scores all of them\n")
    return sets


def default_subset(dataset: Dataset, per_subject: int, seed: int) -> Dataset:
    """``per_subject`` seeded questions of every subject (all of a smaller subject), in the original order."""
    subjects = np.asarray(dataset["subject"], dtype=object)
    rng = np.random.default_rng(seed)
    keep = []
    for subject in sorted(set(subjects.tolist())):
        rows = np.flatnonzero(subjects == subject)
        keep.extend(rows if len(rows) <= per_subject else rng.choice(rows, size=per_subject, replace=False))
    return dataset.select(sorted(int(i) for i in keep))


def choice_token_ids(tokenizer: Any) -> list[int]:
    """The ids of the single tokens ``" A"`` .. ``" D"`` that the model scores."""
    return letter_token_ids(tokenizer, MMLU_CHOICES)


def evaluate_mmlu(model: torch.nn.Module, sets: Mapping[int, Dataset], tokenizer: Any, metadata: dict[str, Any], *,
                  batch_size: int, ensemble: int, chunk_size: int | None, seed: int,
                  scoring: str = "letter") -> EvalResult:
    """MMLU for every shot count (``mmlu_<k>shot``: micro ``accuracy``, ``accuracy_macro`` over subjects,
    ``accuracy_<subject>``, ece/nll/brier on the 4 choice probabilities); top-level ``accuracy`` and
    ``accuracy_macro`` are the means over the shot counts. `scoring`: ``letter`` (the answer letters' next-token
    logits, the sets from `load_mmlu_eval` with ``scoring="letter"``) or ``cloze`` / ``cloze_mean`` (each choice's
    text after a `mmlu_cloze_prompt`, summed or averaged over its tokens: `mmlu_cloze.score_mmlu_cloze`)."""
    from .mmlu_cloze import score_mmlu_cloze

    if scoring not in CHOICE_SCORINGS:
        raise DataError(f"MMLU scoring must be one of {list(CHOICE_SCORINGS)}, got {scoring!r}")
    max_len = min(MMLU_MAX_LEN, int(getattr(model.config, "max_position_embeddings", MMLU_MAX_LEN) or MMLU_MAX_LEN))
    info = metadata.setdefault("mmlu", {})
    info["max_prompt_tokens"] = max_len
    info["left_truncated_prompts"] = {}
    single: dict[str, Any] = {}
    ens: dict[str, Any] | None = {"ensemble_size": ensemble} if ensemble else None
    rows: list[dict[str, Any]] = []
    token_sets = {shots: tokenizer(list(questions["prompt"]))["input_ids"] for shots, questions in sets.items()}
    if scoring == "letter":
        choice_ids = choice_token_ids(tokenizer)
        line, info["estimate"] = estimate_line(model, token_sets, {s: list(q["subject"]) for s, q in sets.items()},
                                               batch_size=batch_size, ensemble=ensemble, max_len=max_len)
        sys.stderr.write(line + "\n")
    for shots, questions in sets.items():
        key = f"mmlu_{shots}shot"
        labels = torch.tensor(list(questions["answer"]))
        token_ids = token_sets[shots]
        info["left_truncated_prompts"][key] = sum(len(ids) > max_len for ids in token_ids)
        subjects = list(questions["subject"])
        timing: dict[str, Any] = {}
        if scoring == "letter":
            probs, ens_probs, mi = score_choices(model, tokenizer, questions["prompt"], choice_ids,
                                                 batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size,
                                                 seed=seed + 7919 * shots, max_len=max_len, desc=f"MMLU {shots}-shot",
                                                 token_ids=token_ids, timing=timing, prefix_keys=subjects)
        else:
            probs, ens_probs, mi = score_mmlu_cloze(model, tokenizer, questions, per_token=scoring == "cloze_mean",
                                                    batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size,
                                                    seed=seed + 7919 * shots, max_len=max_len, timing=timing,
                                                    prompt_ids=token_ids)
        timing["seconds_per_question"] = timing["seconds"] / max(timing["questions"], 1)
        info.setdefault("timing", {})[key] = {k: round(v, 4) if isinstance(v, float) else v
                                              for k, v in timing.items()}

        def metrics(p: torch.Tensor, labels: torch.Tensor = labels, subjects: list[str] = subjects) -> dict[str, Any]:
            calibration = classification_calibration(p, labels)
            return {**mmlu_metrics(p.numpy(), labels.numpy(), subjects),
                    **{k: calibration[k] for k in CALIBRATION_METRICS}, "n": len(labels)}

        single[key] = metrics(probs)
        if ens is not None:
            ens[key] = metrics(ens_probs)
        for i in range(len(labels)):
            rows.append({"index": i, "setting": key, "subject": subjects[i], "label": int(labels[i]),
                         "label_letter": MMLU_CHOICES[int(labels[i])], **class_prediction_fields(
                             probs[i], *((ens_probs[i], mi[i]) if ens_probs is not None else ()))})
    for target in (single, ens):
        if target is not None:
            keys = [f"mmlu_{s}shot" for s in sets]
            target["accuracy"] = float(np.mean([target[k]["accuracy"] for k in keys]))
            target["accuracy_macro"] = float(np.mean([target[k]["accuracy_macro"] for k in keys]))
    return EvalResult(single=single, ensemble=ens, rows=rows)


TASK_SPECS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec(
        name="mmlu", family="mmlu", kind="causal_lm", num_labels=4, label_names=MMLU_CHOICES,
        text_columns=("prompt",), metric_names=("accuracy", "accuracy_macro"), main_metric="accuracy",
        label_column="answer", hub_name=None, trainable=False,
        description="MMLU 57-subject multiple choice, scored by the choice letters' likelihood (evaluation only)",
        loader=load_mmlu_task, preprocessor=preprocess_mmlu, metrics=mmlu_task_metrics,
    ),
}
