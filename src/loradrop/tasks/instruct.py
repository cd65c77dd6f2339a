"""Instruction tuning: causal-LM SFT on Alpaca-format data (``instruction, input, output`` and optional
``history``), evaluated on MMLU 0-shot and 5-shot (`loradrop.tasks.mmlu`) plus the SFT validation loss.

SFT examples are formatted with the Stanford Alpaca template; the response is followed by the EOS token and the
labels are ``-100`` on every prompt token, so the loss covers the response only. Alpaca files have no validation
split: one is held out with `split_indices` (``seed``, ``validation_fraction``, default 0.1), recorded in the
metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict, Features, List, Value

from ..ensemble import eval_mode
from ..errors import DataError, UsageError
from .base import (
    first_existing,
    get_metadata,
    make_dataset,
    read_text,
    require_columns,
    require_data_root,
    split_indices,
)
from .classification import check_encoded, unsupported_options
from .mmlu import evaluate_mmlu, load_mmlu_eval
from .spec import EvalResult, TaskData, TaskSpec

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
        text = read_text(Path(path))
        records = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else json.loads(text))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of {{instruction, input, output}} records, "
                         f"got {type(records).__name__}")
    cols: dict[str, list[Any]] = {k: [] for k in ALPACA_FEATURES}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
        missing = [k for k in ("instruction", "output") if k not in rec]
        if missing:
            raise DataError(f"{path}: record {i} lacks {missing}; Alpaca records need instruction and output "
                             f"(input, history optional); it has {sorted(rec)}")
        for key in ("instruction", "input", "output"):
            if not isinstance(rec.get(key, ""), str):
                raise DataError(f"{path}: record {i} field {key!r} must be a string, got {type(rec[key]).__name__}")
        history = rec.get("history") or []
        if not all(isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t)
                   for t in history):
            raise DataError(f"{path}: record {i} 'history' must be a list of [instruction, response] pairs")
        if not rec["output"]:
            raise DataError(f"{path}: record {i} has an empty output")
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
        raise DataError(f"{task}: no Alpaca-format file {list(DEFAULT_FILES[task])} in "
                         f"{[str(f) for f in folders]}; pass the .json file itself as data_dir")
    return found


def load_instruct(
    spec: TaskSpec, data_dir: Path | None, *, seed: int = 0, validation_fraction: float | None = None
) -> tuple[DatasetDict, dict[str, Any]]:
    """Load an Alpaca-format file and hold out a seeded validation split."""
    data_dir = Path(data_dir) if data_dir is not None else require_data_root()
    if not data_dir.exists():
        raise DataError(f"{spec.name}: data_dir {data_dir} does not exist")
    path = find_alpaca_file(spec.name, data_dir)
    cols = read_alpaca_json(path)
    fraction = INSTRUCT_VALIDATION_FRACTION if validation_fraction is None else validation_fraction
    full = make_dataset(cols, ALPACA_FEATURES)
    if len(full) == 0:
        raise DataError(f"{spec.name}: {path} holds no records")
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
        raise DataError(f"max_seq_len must be an integer >= 8, got {max_seq_len!r}")
    out = {}
    for split, dataset in dataset_dict.items():
        require_columns(dataset.column_names, ("instruction", "output"), f"{spec.name} split {split!r}")
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
        raise DataError(f"{spec.name}: expected logits (n, T, V) and labels (n, T), got {logits.shape} and "
                         f"{labels.shape}")
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    if not mask.any():
        raise DataError(f"{spec.name}: every label is {IGNORE_INDEX}; nothing to score")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    safe = np.where(mask, labels, 0)
    nll = -np.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    loss = float(nll[mask].mean())
    accuracy = float((logits.argmax(-1) == labels)[mask].mean())
    return {"loss": loss, "perplexity": float(np.exp(loss)), "token_accuracy": accuracy}


# ------------------------------------------------------------------------------------------------ runs
def prepare_instruct(spec: TaskSpec, raw: DatasetDict, tokenizer: Any, *, max_seq_len: int, need_train: bool = True,
                     data_dir: str | None = None, seed: int = 0, max_eval_samples: int | None = None,
                     mmlu_scoring: str = "letter", **_: Any) -> TaskData:
    """SFT train / validation ids (labels -100 on the prompt) and the MMLU test questions it is scored on: a seeded
    ``max_eval_samples`` of them, or without it the default subset (`MMLU_DEFAULT_QUESTIONS_PER_SUBJECT` per
    subject, recorded in ``metadata["mmlu"]["subset"]``), prompted for `mmlu_scoring` (``letter``, ``cloze``,
    ``cloze_mean``: `cloze_scoring.with_choice_scoring` sets it from the run's ``choice_scoring``)."""
    from transformers import DataCollatorForSeq2Seq

    splits = ("train", "validation") if need_train else ("validation",)
    encoded = spec.preprocessor(spec, DatasetDict({k: raw[k] for k in splits}), tokenizer, max_seq_len)
    train = encoded["train"] if need_train else None
    check_encoded(spec, max_seq_len, train=train, validation=encoded["validation"])
    metadata = get_metadata(raw)
    mmlu = load_mmlu_eval(data_dir, max_eval_samples, seed, metadata, scoring=mmlu_scoring)
    return TaskData(spec=spec, raw=raw, train=train, eval_loss=encoded["validation"], eval_split="mmlu:test",
                    collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
                    metadata=metadata, extras={"mmlu": mmlu, "mmlu_scoring": mmlu_scoring},
                    recorded={"choice_scoring": mmlu_scoring})


@torch.no_grad()
def sft_loss(model: torch.nn.Module, dataset: Any, collator: Any, *, batch_size: int) -> float:
    """Token-level mean next-token NLL of the responses (single pass, eval mode) on the SFT validation split, in
    batches of `batch_size` rows: the run's evaluation batch size (`evaluate`'s ``batch_size``: ``--batch-size``, or
    for ``loradrop eval`` its own ``--batch-size``, else the training run's recorded ``eval_batch_size``). The rows
    run sorted by length (less padding); the loss is a sum over tokens, so neither changes its value."""
    from torch.utils.data import DataLoader

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"the evaluation batch size must be an integer >= 1, got {batch_size!r}")
    device = next(model.parameters()).device
    order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in DataLoader(dataset.select(order.tolist()), batch_size=batch_size, collate_fn=collator):
            labels = batch["labels"][:, 1:].to(device)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(nll)
            count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate_instruct(model: torch.nn.Module, data: TaskData, tokenizer: Any, *, batch_size: int, ensemble: int,
                      chunk_size: int | None, seed: int, **options: Any) -> EvalResult:
    """MMLU 0-shot and 5-shot (see `loradrop.tasks.mmlu.evaluate_mmlu`); the single pass also reports the SFT
    validation loss and perplexity."""
    unsupported_options(data.spec, options)
    result = evaluate_mmlu(model, data.extras["mmlu"], tokenizer, data.metadata, batch_size=batch_size,
                           ensemble=ensemble, chunk_size=chunk_size, seed=seed,
                           scoring=data.extras.get("mmlu_scoring", "letter"))
    loss = sft_loss(model, data.eval_loss, data.collator, batch_size=batch_size)
    result.single.update(sft_validation_loss=loss, sft_validation_perplexity=float(math.exp(min(loss, 50.0))))
    return result



TASK_SPECS: dict[str, TaskSpec] = {
    "alpaca": TaskSpec(
        name="alpaca", family="instruct", kind="causal_lm", num_labels=0, label_names=(),
        text_columns=("instruction", "input"), metric_names=("loss", "perplexity", "token_accuracy"),
        main_metric="loss", label_column="output", hub_name="tatsu-lab/alpaca",
        description="Alpaca-format instruction SFT (default: LLaMA-Factory's 1k alpaca_en_demo.json)",
        loader=load_instruct, preprocessor=preprocess_instruct, metrics=causal_lm_metrics,
        prepare=prepare_instruct, evaluate=evaluate_instruct,
    ),
    "lima": TaskSpec(
        name="lima", family="instruct", kind="causal_lm", num_labels=0, label_names=(),
        text_columns=("instruction", "input"), metric_names=("loss", "perplexity", "token_accuracy"),
        main_metric="loss", label_column="output", hub_name=None,
        description="LIMA (1029 examples) in Alpaca format with multi-turn history",
        loader=load_instruct, preprocessor=preprocess_instruct, metrics=causal_lm_metrics,
        prepare=prepare_instruct, evaluate=evaluate_instruct,
    ),
}
