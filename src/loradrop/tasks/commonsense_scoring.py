"""Letter scoring of multiple-choice prompts with a causal LM (the commonsense tasks, `loradrop.tasks.commonsense`):
the prompts, the left-padding collators, the training loss (cross-entropy over the answer letters), and the
evaluation through the classification code (`evaluate_classification`: accuracy, ECE, NLL, Brier of the single pass
and of the LoRA Dropout or MC-dropout ensemble) by wrapping the LM in `LetterScorer`, a module whose ``logits`` are
the answer letters' next-token logits at the last prompt position (letters a question does not have masked out).

Padding is on the left with explicit ``position_ids`` (the count of real tokens before each one), so the last
position of every row is its last real prompt token and a padded row gets the positions it has alone; the LM
computes the logits of that position only (``logits_to_keep=1``): one forward per question, no generation.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from datasets import DatasetDict
from torch import nn

from ..errors import DataError, UsageError
from .base import letter_token_ids, require_columns
from .classification import encode_splits, evaluate_classification
from .spec import EvalResult, TaskData, TaskSpec

IGNORE_INDEX = -100
LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E")
STYLES = {"arc_easy": "question", "arc_challenge": "question", "openbookqa": "question", "boolq": "boolq",
          "winogrande_s": "winogrande", "winogrande_m": "winogrande", "piqa": "piqa"}


def format_choice_prompt(style: str, question: str, choices: Sequence[str], context: str = "") -> str:
    """The prompt of one example: the question (BoolQ: passage and question; WinoGrande: the sentence with its
    blank; PIQA: the goal), the choices lettered ``A.`` ``B.`` ..., and ``"Answer:"``; the answer is the next token
    (``" A"``...)."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise DataError(f"a question needs 2 to {len(LETTERS)} choices, got {len(choices)}: {question[:60]!r}")
    if style == "boolq":
        head = [f"Passage: {context}", f"Question: {question}?"]
    elif style == "winogrande":
        head = [f"Sentence: {question}", "Which option fills the blank (_)?"]
    elif style == "piqa":
        head = [f"Goal: {question}", "Which solution reaches the goal?"]
    elif style == "question":
        head = [f"Question: {question}"]
    else:
        raise DataError(f"unknown prompt style {style!r}; allowed: ['boolq', 'piqa', 'question', 'winogrande']")
    lines = [*head, "Choices:", *(f"{letter}. {text}" for letter, text in zip(LETTERS, choices)), "Answer:"]
    return "\n".join(lines)


def prompt_style(spec: TaskSpec) -> str:
    """The prompt style of a task (the OOD tasks are prompted as their training task, OpenBookQA)."""
    return STYLES.get(spec.name, "question")


def preprocess_choices(spec: TaskSpec, dataset_dict: DatasetDict, tokenizer: Any, max_seq_len: int,
                       **_: Any) -> DatasetDict:
    """Prompts (`format_choice_prompt`) tokenized and cut from the left to `max_seq_len` tokens (so the choices and
    ``"Answer:"`` survive; only long BoolQ passages are cut), with ``labels`` (the answer index) and ``n_choices``."""
    if not isinstance(max_seq_len, int) or max_seq_len < 8:
        raise DataError(f"max_seq_len must be an integer >= 8, got {max_seq_len!r}")
    style = prompt_style(spec)

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        prompts = [format_choice_prompt(style, q, c, x)
                   for q, c, x in zip(batch["question"], batch["choices"], batch["context"])]
        ids = [seq[-max_seq_len:] for seq in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        return {"input_ids": ids, "labels": batch["label"], "n_choices": [len(c) for c in batch["choices"]]}

    return map_choice_splits(spec, dataset_dict, encode)


def map_choice_splits(spec: TaskSpec, dataset_dict: DatasetDict, encode: Any, how: str = "") -> DatasetDict:
    """Every split of multiple-choice rows (question, choices, context, label) through the batched `encode`."""
    out = {}
    for split, dataset in dataset_dict.items():
        require_columns(dataset.column_names, ("question", "choices", "context", "label"),
                        f"{spec.name} split {split!r}")
        out[split] = dataset.map(encode, batched=True, remove_columns=dataset.column_names,
                                 desc=f"tokenize {spec.name}/{split}{how}")
    return DatasetDict(out)


def pad_token_id(tokenizer: Any) -> int:
    """The id a left-padded batch pads with: the tokenizer's pad token, else its eos token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UsageError("the tokenizer has neither a pad nor an eos token to pad with")
    return pad_id


def left_pad(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of a left-padded batch (pads at position 0)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, width - n:] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp_min(0)}


@dataclasses.dataclass
class ChoiceCollator:
    """Left-padded batches. ``train=True`` (the Trainer): ``labels`` is ``(B, 1 + K)``: ``-100`` except, at column
    ``1 + answer``, the question's number of choices; so the Trainer counts exactly one target per question (its
    ``num_items_in_batch``, with or without its causal shift) and `letter_loss` reads the answer and the valid
    letters from it; and ``logits_to_keep=1``. ``train=False`` (evaluation): ``labels`` is the answer index and
    ``choice_mask`` ``(B, K)`` marks the letters each question has."""

    pad_id: int
    num_letters: int
    train: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = left_pad(features, self.pad_id)
        answers = torch.tensor([int(f["labels"]) for f in features])
        counts = torch.tensor([int(f["n_choices"]) for f in features])
        if bool(((answers < 0) | (answers >= counts) | (counts > self.num_letters)).any()):
            raise DataError(f"answer index outside its choices (answers {answers.tolist()}, choices "
                            f"{counts.tolist()}, at most {self.num_letters} letters)")
        if self.train:
            labels = torch.full((len(features), 1 + self.num_letters), IGNORE_INDEX, dtype=torch.long)
            labels[torch.arange(len(features)), 1 + answers] = counts
            batch.update(labels=labels, logits_to_keep=1)
        else:
            batch.update(labels=answers, choice_mask=torch.arange(self.num_letters)[None, :] < counts[:, None])
        return batch


def letter_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None, *,
                letter_ids: Sequence[int]) -> torch.Tensor:
    """The Trainer's ``compute_loss_func``: cross-entropy of the answer over the question's letters (softmax over
    the letters it has, at the last position), summed and divided by the Trainer's count of questions (the mean
    over the batch, or over every micro-batch of a gradient-accumulation step). A LoRA Dropout model trained with
    ``samples=N`` returns N member-major copies of the batch: each counts 1/N, so the loss is the mean over members."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    logits = logits[:, -1, :]
    targets = labels[:, 1:]
    rows, batch = logits.shape[0], targets.shape[0]
    if rows % batch:
        raise ValueError(f"{rows} output rows for a batch of {batch}")
    times = rows // batch
    answers = (targets != IGNORE_INDEX).long().argmax(-1)
    counts = targets.max(-1).values
    index = torch.as_tensor(list(letter_ids), device=logits.device)
    letter_logits = logits.index_select(-1, index).float()
    valid = torch.arange(len(letter_ids), device=logits.device)[None, :] < counts[:, None]
    letter_logits = letter_logits.masked_fill(~valid.repeat(times, 1), float("-inf"))
    total = nn.functional.cross_entropy(letter_logits, answers.repeat(times), reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else batch
    return total / (torch.as_tensor(count, device=total.device, dtype=total.dtype) * times)


class LMClassifier(nn.Module):
    """The common part of the scorers that show a causal LM as a classifier over a question's choices
    (`LetterScorer`, `cloze_scoring.ClozeScorer`): the LM is kept as ``.module``, where loradrop finds its LoRA
    Dropout controller (ensembles) and PEFT's dropout (MC dropout), and whether it computes the logits of the last
    positions only (``logits_to_keep``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model
        # mirror the LM's train/eval mode: a new Module is in training mode, and `eval_mode(scorer)` restores the
        # scorer's mode on exit, which would otherwise leave an LM in eval mode switched to training (masks on)
        self.train(model.training)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.keeps_last = "logits_to_keep" in inspect.signature(base.forward).parameters

    @property
    def config(self) -> Any:
        return getattr(self.module, "config", None)

    def get_output_embeddings(self) -> Any:
        return self.module.get_output_embeddings() if hasattr(self.module, "get_output_embeddings") else None


class LetterScorer(LMClassifier):
    """A causal LM seen as a classifier: ``forward(input_ids, attention_mask, position_ids, choice_mask)`` returns
    an output whose ``logits`` ``(rows, K)`` are the answer letters' next-token logits at the last position (letters
    outside ``choice_mask`` at ``-inf``, so a softmax gives the probabilities over the question's choices). The LM
    is kept as ``.module``, where loradrop finds its LoRA Dropout controller (ensembles) and PEFT's dropout (MC
    dropout); an ensemble's member-major rows get the mask of their question."""

    def __init__(self, model: nn.Module, letter_ids: Sequence[int]) -> None:
        super().__init__(model)
        self.register_buffer("letter_ids", torch.as_tensor(list(letter_ids), dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                choice_mask: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        kwargs = {"logits_to_keep": 1} if self.keeps_last else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        logits = self.module(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, -1, :]
        letters = logits.index_select(-1, self.letter_ids.to(logits.device))
        if choice_mask is not None:
            mask = choice_mask.to(letters.device).bool()
            letters = letters.masked_fill(~mask.repeat(letters.shape[0] // mask.shape[0], 1), float("-inf"))
        return SequenceClassifierOutput(logits=letters)


def prepare_choices(spec: TaskSpec, raw: DatasetDict, tokenizer: Any, *, max_seq_len: int, need_train: bool = True,
                    **_: Any) -> TaskData:
    """Tokenized train / validation (the Trainer's eval loss) and evaluation split (``test`` with a held-out
    validation, else ``validation``), the training collator and loss (`letter_loss`), and what `evaluate_choices`
    needs (the letter ids, the evaluation collator)."""
    from .base import get_metadata

    letters = LETTERS[:spec.num_labels]
    letter_ids = letter_token_ids(tokenizer, letters)
    eval_split, encoded, train, eval_loss = encode_splits(spec, raw, tokenizer, max_seq_len, need_train)
    pad_id = pad_token_id(tokenizer)
    metadata = get_metadata(raw)
    metadata["choice_scoring"] = {
        "letters": list(letters), "letter_token_ids": letter_ids, "padding": "left, with position_ids",
        "training_loss": "cross-entropy over the question's answer letters at the last prompt position",
        "left_truncated_prompts": {k: sum(len(ids) >= max_seq_len for ids in v["input_ids"])
                                   for k, v in encoded.items()}}
    return TaskData(spec=spec, raw=raw, train=train, eval_loss=eval_loss, eval_split=eval_split,
                    collator=ChoiceCollator(pad_id, len(letters), train=True), metadata=metadata,
                    extras={"encoded": {k: v for k, v in encoded.items() if k != "train"}, "letter_ids": letter_ids,
                            "eval_collator": ChoiceCollator(pad_id, len(letters), train=False)},
                    recorded={"choice_letters": "".join(letters)},
                    compute_loss_func=functools.partial(letter_loss, letter_ids=tuple(letter_ids)))


def evaluate_choices(model: nn.Module, data: TaskData, tokenizer: Any = None, *, batch_size: int, ensemble: int,
                     chunk_size: int | None, seed: int, split: str | None = None, mc_dropout: bool = False,
                     progress: bool = True) -> EvalResult:
    """Accuracy, ECE (15 bins), NLL and Brier of the letter probabilities, single pass and ensemble (LoRA Dropout
    members, or MC dropout), with one prediction row per question: `evaluate_classification` on `LetterScorer`."""
    view = dataclasses.replace(data, collator=data.extras["eval_collator"])
    return evaluate_classification(LetterScorer(model, data.extras["letter_ids"]), view, tokenizer,
                                   batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size, seed=seed,
                                   split=split, mc_dropout=mc_dropout, progress=progress)
