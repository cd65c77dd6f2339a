"""Cloze scoring of the commonsense multiple-choice tasks with a causal LM: each choice is scored by the
log-likelihood of its text after the question (the "cloze" or answer-likelihood formulation of lm-evaluation-harness
and lighteval), a softmax over a question's choice scores gives the class probabilities, and training is the
cross-entropy over those scores. It is the alternative to `commonsense_scoring`'s letter format (``choice_scoring``:
``"letter"``, the default; ``"cloze"``, the sum of the choice's token log-probabilities; ``"cloze_mean"``, their
mean, which does not favour short answers) for models too small to bind answers to letters: zero-shot on 150 ARC-Easy
dev questions SmolLM2-135M-Instruct scores 45.3% in cloze form and 25.3% (chance) with letters, and letter-format
fine-tuning left it at chance (`studies/commonsense/results/letter_tune_partial`).

One question becomes one row per choice: ``prefix + continuation`` token ids, left-padded (with ``position_ids``) so
every row's continuation ends at the last position, and the LM computes the logits of the last ``c + 1`` positions
only (``logits_to_keep``; ``c`` the batch's longest continuation). A choice's score is the sum of its continuation's
token log-probabilities. Prompts: ARC / OpenBookQA / MMLU ``"Question: ...\\nAnswer:"`` + ``" <choice>"``; BoolQ the
passage and question, then ``" no"`` / ``" yes"``; PIQA the goal, then ``" <solution>"``; WinoGrande the sentence up
to the blank with each option filled in, scored on the rest of the sentence (the same continuation for both, the
usual partial scoring). LoRA Dropout's test-time members share their masks across all rows of a call, so a member
scores all choices of a question under one mask; with ``mask_scope="example"`` in training each choice row draws its
own mask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
from datasets import DatasetDict
from torch import nn

from ..errors import DataError, UsageError
from ..training import LOSS_INPUTS
from .classification import encode_splits, evaluate_classification
from .commonsense_scoring import IGNORE_INDEX, LMClassifier, left_pad, map_choice_splits, pad_token_id, prompt_style
from .spec import CHOICE_SCORINGS, EvalResult, TaskData, TaskSpec


def cloze_parts(style: str, question: str, choices: Sequence[str], context: str = "") -> list[tuple[str, str]]:
    """``(prefix, continuation)`` per choice: the continuation's log-likelihood after the prefix is the choice's
    score."""
    if len(choices) < 2:
        raise DataError(f"a question needs at least 2 choices, got {len(choices)}: {question[:60]!r}")
    if style == "winogrande":
        if question.count("_") != 1:
            raise DataError(f"a WinoGrande sentence needs exactly one blank (_), got {question!r}")
        before, after = question.split("_")
        if after.strip():
            return [(before + option, after) for option in choices]
        return [(before.rstrip(), " " + option + after) for option in choices]  # blank at the end: score the option
    if style == "boolq":
        prefix = f"Passage: {context}\nQuestion: {question}?\nAnswer:"
    elif style == "piqa":
        prefix = f"Goal: {question}\nSolution:"
    elif style == "question":
        prefix = f"Question: {question}\nAnswer:"
    else:
        raise DataError(f"unknown prompt style {style!r}; allowed: ['boolq', 'piqa', 'question', 'winogrande']")
    return [(prefix, " " + str(choice).strip()) for choice in choices]


def preprocess_cloze(spec: TaskSpec, dataset_dict: DatasetDict, tokenizer: Any, max_seq_len: int,
                     **_: Any) -> DatasetDict:
    """Per question: ``choice_ids`` (prefix + continuation token ids of each choice, cut from the left to
    `max_seq_len` so the continuation survives), ``cont_lens``, ``labels`` (the answer index) and ``n_choices``."""
    if not isinstance(max_seq_len, int) or max_seq_len < 8:
        raise DataError(f"max_seq_len must be an integer >= 8, got {max_seq_len!r}")
    style = prompt_style(spec)

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        all_ids, all_lens = [], []
        for question, choices, context in zip(batch["question"], batch["choices"], batch["context"]):
            ids, lens = [], []
            for prefix, continuation in cloze_parts(style, question, choices, context):
                head = tokenizer(prefix, add_special_tokens=True)["input_ids"]
                tail = tokenizer(continuation, add_special_tokens=False)["input_ids"][:max_seq_len - 1]
                ids.append((head + tail)[-max_seq_len:])
                lens.append(len(tail))
            all_ids.append(ids)
            all_lens.append(lens)
        return {"choice_ids": all_ids, "cont_lens": all_lens, "labels": batch["label"],
                "n_choices": [len(c) for c in batch["choices"]]}

    return map_choice_splits(spec, dataset_dict, encode, " (cloze)")


@dataclasses.dataclass
class ClozeCollator:
    """One row per choice, left-padded; ``cont_targets`` ``(rows, c)`` holds each row's continuation tokens
    right-aligned (``-100`` elsewhere) and ``row_slots`` each row's place ``question * K + choice`` in the
    ``(questions, K)`` score table. ``train=True`` (the Trainer): ``labels`` ``(B, 2)`` is ``-100`` except the answer
    in column 1 (so the Trainer counts one target per question, with or without its causal shift), the two row
    tensors travel under `LOSS_INPUTS` (the loss reads them, the model never sees them), and ``logits_to_keep`` is
    ``c + 1``. ``train=False``: ``labels`` is the answer index and ``choice_mask`` ``(B, K)`` marks the choices each
    question has; every value is a tensor (`ClozeScorer` takes them all)."""

    pad_id: int
    num_choices: int
    train: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        answers = torch.tensor([int(f["labels"]) for f in features])
        counts = torch.tensor([int(f["n_choices"]) for f in features])
        if bool(((answers < 0) | (answers >= counts) | (counts > self.num_choices)).any()):
            raise DataError(f"answer index outside its choices (answers {answers.tolist()}, choices "
                            f"{counts.tolist()}, at most {self.num_choices})")
        rows = [ids for f in features for ids in f["choice_ids"]]
        lens = [int(n) for f in features for n in f["cont_lens"]]
        slots = torch.tensor([q * self.num_choices + k for q, f in enumerate(features)
                              for k in range(len(f["choice_ids"]))])
        batch: dict[str, Any] = left_pad([{"input_ids": ids} for ids in rows], self.pad_id)
        width = max(max(lens), 1)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, n) in enumerate(zip(rows, lens)):
            if n:
                targets[r, width - n:] = torch.as_tensor(ids[-n:], dtype=torch.long)
        if self.train:
            labels = torch.full((len(features), 2), IGNORE_INDEX, dtype=torch.long)
            labels[:, 1] = answers
            batch.update(labels=labels, logits_to_keep=width + 1,
                         **{LOSS_INPUTS: {"cont_targets": targets, "row_slots": slots}})
        else:
            batch.update(labels=answers, choice_mask=torch.arange(self.num_choices)[None, :] < counts[:, None],
                         cont_targets=targets, row_slots=slots)
        return batch


def choice_scores(logits: torch.Tensor, cont_targets: torch.Tensor, row_slots: torch.Tensor, questions: int,
                  num_choices: int, per_token: bool = False) -> torch.Tensor:
    """``(members * questions, K)`` choice scores (sums of continuation log-probabilities, or with `per_token` their
    means; ``-inf`` where a question has no such choice) from the LM's ``(members * rows, positions, vocab)``
    logits, member-major."""
    rows, width = cont_targets.shape
    if logits.shape[0] % rows:
        raise ValueError(f"{logits.shape[0]} output rows for {rows} choice rows")
    members = logits.shape[0] // rows
    predicting = logits[:, -(width + 1):-1, :]  # position t predicts token t + 1
    targets = cont_targets.to(logits.device).repeat(members, 1)
    token_logp = -nn.functional.cross_entropy(predicting.float().flatten(0, 1), targets.flatten(),
                                              ignore_index=IGNORE_INDEX, reduction="none")
    per_row = token_logp.view(members, rows, width).sum(-1)
    if per_token:
        per_row = per_row / cont_targets.ne(IGNORE_INDEX).sum(-1).clamp_min(1).to(per_row.device)
    table = per_row.new_full((members, questions * num_choices), float("-inf"))
    table[:, row_slots.to(logits.device)] = per_row
    return table.view(members * questions, num_choices)


def cloze_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None, *, cont_targets: torch.Tensor,
               row_slots: torch.Tensor, num_choices: int, per_token: bool = False) -> torch.Tensor:
    """The Trainer's ``compute_loss_func``: cross-entropy of the answer over the question's choice scores, summed
    and divided by the Trainer's count of questions; a LoRA Dropout model trained with ``samples=N`` returns N
    member-major copies of the rows, each counting 1/N (the mean over members)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    answers = labels[:, 1]
    questions = answers.shape[0]
    scores = choice_scores(logits, cont_targets, row_slots, questions, num_choices, per_token)
    times = scores.shape[0] // questions
    total = nn.functional.cross_entropy(scores, answers.to(scores.device).repeat(times), reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else questions
    return total / (torch.as_tensor(count, device=total.device, dtype=total.dtype) * times)


class ClozeScorer(LMClassifier):
    """A causal LM seen as a classifier over a question's choices: ``forward`` takes a `ClozeCollator` evaluation
    batch and returns an output whose ``logits`` ``(rows, K)`` are the choice scores (absent choices ``-inf``)."""

    def __init__(self, model: nn.Module, num_choices: int, per_token: bool = False) -> None:
        super().__init__(model)
        self.num_choices = num_choices
        self.per_token = per_token

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                choice_mask: torch.Tensor | None = None, cont_targets: torch.Tensor | None = None,
                row_slots: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if choice_mask is None or cont_targets is None or row_slots is None:
            raise UsageError("ClozeScorer needs a ClozeCollator(train=False) batch: choice_mask, cont_targets and "
                             "row_slots")
        kwargs: dict[str, Any] = {"logits_to_keep": cont_targets.shape[1] + 1} if self.keeps_last else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        logits = self.module(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        return SequenceClassifierOutput(logits=choice_scores(logits, cont_targets, row_slots, choice_mask.shape[0],
                                                             self.num_choices, self.per_token))


def prepare_cloze(spec: TaskSpec, raw: DatasetDict, tokenizer: Any, *, max_seq_len: int, need_train: bool = True,
                  per_token: bool = False, **_: Any) -> TaskData:
    """As `commonsense_scoring.prepare_choices`, in cloze form: `ClozeCollator` batches and `cloze_loss` (choice
    scores per token with `per_token`)."""
    from .base import get_metadata

    eval_split, encoded, train, eval_loss = encode_splits(spec, raw, tokenizer, max_seq_len, need_train)
    pad_id = pad_token_id(tokenizer)
    k = spec.num_labels
    metadata = get_metadata(raw)
    metadata["choice_scoring"] = {
        "scoring": (f"cloze: the {'mean' if per_token else 'sum'} of each choice's continuation token "
                    "log-probabilities, softmax over the choices"),
        "padding": "left, with position_ids; one row per choice",
        "training_loss": "cross-entropy over the question's choice scores",
        "left_truncated_rows": {s: sum(len(ids) >= max_seq_len for q in v["choice_ids"] for ids in q)
                                for s, v in encoded.items()}}
    return TaskData(spec=spec, raw=raw, train=train, eval_loss=eval_loss, eval_split=eval_split,
                    collator=ClozeCollator(pad_id, k, train=True), metadata=metadata,
                    extras={"encoded": {s: v for s, v in encoded.items() if s != "train"}, "num_choices": k,
                            "per_token": per_token, "eval_collator": ClozeCollator(pad_id, k, train=False)},
                    recorded={"choice_scoring": "cloze_mean" if per_token else "cloze"},
                    compute_loss_func=functools.partial(cloze_loss, num_choices=k, per_token=per_token))


def evaluate_cloze(model: nn.Module, data: TaskData, tokenizer: Any = None, *, batch_size: int, ensemble: int,
                   chunk_size: int | None, seed: int, split: str | None = None, mc_dropout: bool = False,
                   progress: bool = True) -> EvalResult:
    """Accuracy, ECE (15 bins), NLL and Brier of the choice probabilities, single pass and ensemble, one
    prediction row per question: `evaluate_classification` on `ClozeScorer`."""
    view = dataclasses.replace(data, collator=data.extras["eval_collator"])
    return evaluate_classification(ClozeScorer(model, data.extras["num_choices"], data.extras["per_token"]), view,
                                   tokenizer,
                                   batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size, seed=seed,
                                   split=split, mc_dropout=mc_dropout, progress=progress)


def with_choice_scoring(spec: TaskSpec, scoring: str | None) -> TaskSpec:
    """`spec` scored as `scoring` says: ``"letter"`` (or None) as registered, ``"cloze"`` / ``"cloze_mean"``
    through this module (the commonsense multiple-choice tasks and the MMLU OOD sets), or for an instruction-tuning
    task its MMLU evaluation in cloze form (`mmlu_cloze`)."""
    if scoring in (None, "letter"):
        return spec
    if scoring not in CHOICE_SCORINGS:
        raise UsageError(f"choice_scoring must be one of {list(CHOICE_SCORINGS)}, got {scoring!r}")
    if spec.family == "instruct":
        return dataclasses.replace(spec, prepare=functools.partial(spec.prepare, mmlu_scoring=scoring))
    if spec.family != "commonsense":
        raise UsageError(f"choice_scoring={scoring!r} applies to the multiple-choice tasks scored by a causal LM "
                         f"(commonsense, MMLU OOD sets) and to the MMLU evaluation of instruction tuning, not to "
                         f"task {spec.name!r} ({spec.family})")
    prepare = functools.partial(prepare_cloze, per_token=scoring == "cloze_mean")
    return dataclasses.replace(spec, preprocessor=preprocess_cloze, prepare=prepare, evaluate=evaluate_cloze)
