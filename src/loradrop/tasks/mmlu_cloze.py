"""MMLU scored in cloze form: each choice's text after a `mmlu.mmlu_cloze_prompt` (no lettered list; shots answered
with their answer's text), the sum or the per-token mean of its token log-probabilities, softmax over the 4 choices.
It is the cloze formulation that OLMES (Gu et al. 2024) and lm-evaluation-harness use for models too small to answer
with letters; the rows, padding and ensembles are those of the commonsense cloze tasks (`cloze_scoring`), so LoRA
Dropout members score all choices of a question under one mask."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset

from ..prediction import predict_classification
from .cloze_scoring import ClozeCollator, ClozeScorer
from .commonsense_scoring import pad_token_id

NUM_CHOICES = 4


def encode_mmlu_cloze(questions: Dataset, tokenizer: Any, max_len: int,
                      prompt_ids: Sequence[Sequence[int]] | None = None) -> Dataset:
    """One `ClozeCollator` question per MMLU question: ``prompt + " <choice>"`` token ids of each choice, cut from
    the left to `max_len` (the choice survives), its continuation length, the answer index. `prompt_ids`: the
    prompts already tokenized (with special tokens), if the caller has them."""
    if prompt_ids is None:
        prompt_ids = tokenizer(list(questions["prompt"]), add_special_tokens=True)["input_ids"]
    ids, lens = [], []
    for head, choices in zip(prompt_ids, questions["choices"]):
        head = list(head)
        rows, counts = [], []
        for choice in choices:
            tail = tokenizer(" " + str(choice).strip(), add_special_tokens=False)["input_ids"][:max_len - 1]
            rows.append((head + tail)[-max_len:])
            counts.append(len(tail))
        ids.append(rows)
        lens.append(counts)
    return Dataset.from_dict({"choice_ids": ids, "cont_lens": lens, "labels": list(questions["answer"]),
                              "n_choices": [len(c) for c in questions["choices"]]})


def score_mmlu_cloze(model: torch.nn.Module, tokenizer: Any, questions: Dataset, *, per_token: bool, batch_size: int,
                     ensemble: int, chunk_size: int | None, seed: int, max_len: int,
                     timing: dict[str, Any] | None = None, prompt_ids: Sequence[Sequence[int]] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(single-pass probabilities ``(n, 4)``, ensemble probabilities or None, ensemble mutual information or None)
    of `questions` (`load_mmlu` with ``cloze=True``), `batch_size` questions (4 rows each) per pass; `prompt_ids`
    as in `encode_mmlu_cloze`."""
    pad_id = pad_token_id(tokenizer)
    start = time.perf_counter()
    encoded = encode_mmlu_cloze(questions, tokenizer, max_len, prompt_ids)
    # questions sorted by their longest row, so a batch pads to similar lengths (5-shot rows run from ~200 to ~2,000
    # tokens); the outputs are put back in the questions' order
    longest = [max(map(len, rows)) for rows in encoded["choice_ids"]]
    order = sorted(range(len(encoded)), key=longest.__getitem__)
    preds = predict_classification(ClozeScorer(model, NUM_CHOICES, per_token), encoded.select(order),
                                   ClozeCollator(pad_id, NUM_CHOICES, train=False), batch_size=batch_size,
                                   ensemble=ensemble, chunk_size=chunk_size, seed=seed, progress=False)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))

    def restore(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[back]

    if timing is not None:
        timing.update(seconds=time.perf_counter() - start, questions=len(encoded),
                      rows=sum(len(r) for r in encoded["choice_ids"]),
                      padded_tokens=sum(len(group) * NUM_CHOICES * max(longest[q] for q in group)
                                        for group in (order[i:i + batch_size]
                                                      for i in range(0, len(order), batch_size))))
    return restore(preds.single), restore(preds.ensemble), restore(preds.mutual_information)


__all__ = ["encode_mmlu_cloze", "score_mmlu_cloze"]
