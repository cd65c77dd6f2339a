"""Preparation and evaluation of extractive question answering (SQuAD): overlapping windows, start/end logits,
the official EM / F1 after post-processing, the ensemble's averaged start/end distributions, and the calibration of
the start/end token distributions against the gold positions (`span_calibration`)."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from ..calibration import classification_calibration
from ..ensemble import batch_seed, ensemble_predict, entropy, eval_mode
from ..errors import DataError
from .classification import check_encoded, unsupported_options
from .spec import EvalResult, TaskData, TaskSpec

SCORE_TYPES = ("logits", "probs")


def prepare_span(spec: TaskSpec, raw: DatasetDict, tokenizer: Any, *, max_seq_len: int, need_train: bool = True,
                 **_: Any) -> TaskData:
    """Train windows with answer positions, the validation questions in the same layout (the Trainer's eval loss),
    and evaluation windows with ``example_id`` / ``offset_mapping`` (for post-processing) of every split a run
    scores: the evaluation split (``test`` where the data has one, i.e. with ``holdout_fraction``, else
    ``validation``) and, when training, ``validation``."""
    from transformers import default_data_collator

    from .base import get_metadata

    doc_stride = min(128, max_seq_len // 3)
    eval_split = "test" if "test" in raw else "validation"

    def windows(split: str, as_split: str) -> Any:
        return spec.preprocessor(spec, DatasetDict({as_split: raw[split]}), tokenizer, max_seq_len,
                                 doc_stride=doc_stride)[as_split]

    train = windows("train", "train") if need_train else None
    eval_loss = windows("validation", "train") if need_train else None  # answer positions for the eval loss
    check_encoded(spec, max_seq_len, train=train, validation=eval_loss)
    scored = [*(["validation"] if need_train else []), eval_split]
    return TaskData(spec=spec, raw=raw, train=train, eval_loss=eval_loss, eval_split=eval_split,
                    collator=default_data_collator, metadata=get_metadata(raw),
                    extras={"eval_features": {split: windows(split, split) for split in dict.fromkeys(scored)}},
                    recorded={"doc_stride": doc_stride})


def postprocess_squad(
    examples: Dataset | Mapping[str, Sequence[Any]],
    features: Dataset | Mapping[str, Sequence[Any]],
    start_logits: Any,
    end_logits: Any,
    n_best: int = 20,
    max_answer_len: int = 30,
    *,
    score_type: str = "logits",
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """Map per-feature start/end scores back to answer texts: ``{example id: predicted text}``.

    ``start_logits``/``end_logits`` are (num_features, seq_len) logits, or, with ``score_type="probs"``, position
    probabilities (e.g. averaged over ensemble members; a span then scores log p_start + log p_end). The n_best
    starts and ends of every window are combined into spans inside the context of length <= ``max_answer_len``
    tokens; the best span over all windows of an example wins. With ``version_2_with_negative`` the answer is
    ``""`` when the null (CLS) score beats the best span by more than ``null_score_diff_threshold``.
    """
    if score_type not in SCORE_TYPES:
        raise DataError(f"score_type must be one of {list(SCORE_TYPES)}, got {score_type!r}")
    if n_best < 1 or max_answer_len < 1:
        raise DataError(f"n_best and max_answer_len must be >= 1, got {n_best}, {max_answer_len}")
    example_ids = list(examples["id"])
    contexts = list(examples["context"])
    feature_example_ids = list(features["example_id"])
    offsets_all = list(features["offset_mapping"])
    if len(start_logits) != len(feature_example_ids) or len(end_logits) != len(feature_example_ids):
        raise DataError(f"got {len(start_logits)} start / {len(end_logits)} end score rows for "
                         f"{len(feature_example_ids)} features")
    features_per_example: dict[str, list[int]] = collections.defaultdict(list)
    for i, ex_id in enumerate(feature_example_ids):
        features_per_example[ex_id].append(i)

    def scores(row: Any) -> np.ndarray:
        arr = np.asarray(row, dtype=np.float64)
        return np.log(np.clip(arr, 1e-12, None)) if score_type == "probs" else arr

    predictions: dict[str, str] = {}
    for ex_id, context in zip(example_ids, contexts):
        best_text, best_score = "", -np.inf
        min_null = np.inf
        for fi in features_per_example.get(ex_id, []):
            start, end = scores(start_logits[fi]), scores(end_logits[fi])
            offsets = offsets_all[fi]
            min_null = min(min_null, float(start[0] + end[0]))
            start_idx = np.argsort(start)[-1: -n_best - 1: -1]
            end_idx = np.argsort(end)[-1: -n_best - 1: -1]
            for s in start_idx:
                for e in end_idx:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_len:
                        continue
                    score = float(start[s] + end[e])
                    if score > best_score:
                        best_score = score
                        best_text = context[offsets[s][0]: offsets[e][1]]
        if version_2_with_negative and (best_score == -np.inf or min_null - best_score > null_score_diff_threshold):
            predictions[ex_id] = ""
        else:
            predictions[ex_id] = best_text
    return predictions


def gold_positions(examples: Dataset, features: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Per evaluation window, the token positions of the first reference answer's start and end, with the training
    features' convention (`prepare_squad_train_features`): position 0 (CLS) when the window does not hold the whole
    answer or the question has none (SQuAD v2)."""
    answers = {ex_id: a for ex_id, a in zip(examples["id"], examples["answers"])}
    starts, ends = [], []
    for ex_id, offsets in zip(features["example_id"], features["offset_mapping"]):
        answer = answers[ex_id]
        context = [k for k, o in enumerate(offsets) if o is not None]
        start = end = 0
        if len(answer["answer_start"]) and context:
            first, last = answer["answer_start"][0], answer["answer_start"][0] + len(answer["text"][0])
            if offsets[context[0]][0] <= first and offsets[context[-1]][1] >= last:
                start = max(k for k in context if offsets[k][0] <= first)
                end = min(k for k in context if offsets[k][1] >= last)
        starts.append(start)
        ends.append(end)
    return torch.tensor(starts), torch.tensor(ends)


def span_calibration(start_probs: torch.Tensor, end_probs: torch.Tensor, gold: tuple[torch.Tensor, torch.Tensor]
                     ) -> dict[str, float]:
    """``span_ece`` / ``span_nll`` / ``span_brier``: the calibration of the per-window start and end token
    distributions against the gold positions (`gold_positions`), the mean of the two."""
    start = classification_calibration(start_probs, gold[0])
    end = classification_calibration(end_probs, gold[1])
    return {f"span_{k}": (start[k] + end[k]) / 2 for k in ("ece", "nll", "brier")}


@torch.no_grad()
def evaluate_span(model: torch.nn.Module, data: TaskData, tokenizer: Any = None, *, batch_size: int, ensemble: int,
                  chunk_size: int | None, seed: int, split: str | None = None, progress: bool = True,
                  **options: Any) -> EvalResult:
    """EM / F1 of the single pass and of the ensemble (answers read from the averaged start/end probabilities) on
    `split` (default: the evaluation split), each with `span_calibration` of its start/end distributions per window;
    per question, the ensemble's mutual information averaged over start and end and over its windows."""
    unsupported_options(data.spec, options)  # e.g. mc_dropout
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import default_data_collator

    spec = data.spec
    split = split or data.eval_split
    if split not in data.extras["eval_features"]:
        raise DataError(f"{spec.name}: no prepared split {split!r}; prepared: {sorted(data.extras['eval_features'])}")
    examples = data.raw[split]
    features = data.extras["eval_features"][split]
    inputs_only = features.remove_columns([c for c in ("example_id", "offset_mapping") if c in features.column_names])
    loader = DataLoader(inputs_only, batch_size=batch_size, collate_fn=default_data_collator)
    device = next(model.parameters()).device
    starts, ends, ens_starts, ens_ends, start_mi, end_mi = [], [], [], [], [], []
    with eval_mode(model):
        for i, batch in enumerate(tqdm(loader, desc=f"evaluate {split}", leave=False, disable=not progress)):
            inputs = {k: v.to(device) for k, v in batch.items()}
            out = model(**inputs)
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
            if ensemble:
                ens = ensemble_predict(model, inputs, ensemble, chunk_size=chunk_size, seed=batch_seed(seed, i))
                ens_starts.append(ens.start_probs.cpu())
                ens_ends.append(ens.end_probs.cpu())
                for mean, members, into in ((ens.start_probs, ens.member_start_probs, start_mi),
                                            (ens.end_probs, ens.member_end_probs, end_mi)):
                    into.append((entropy(mean.double()) - entropy(members.double()).mean(0)).cpu())
    version_2 = spec.name == "squad_v2"
    single_text = postprocess_squad(examples, features, torch.cat(starts).numpy(), torch.cat(ends).numpy(),
                                    version_2_with_negative=version_2)
    gold = gold_positions(examples, features)
    single = {**spec.metrics(spec, single_text, examples), "n": len(examples),
              **span_calibration(torch.cat(starts).softmax(-1), torch.cat(ends).softmax(-1), gold)}
    ens_text, ens_metrics, by_example = None, None, {}
    if ensemble:
        ens_text = postprocess_squad(examples, features, torch.cat(ens_starts).numpy(), torch.cat(ens_ends).numpy(),
                                     score_type="probs", version_2_with_negative=version_2)
        ens_metrics = {**spec.metrics(spec, ens_text, examples), "n": len(examples), "ensemble_size": ensemble,
                       **span_calibration(torch.cat(ens_starts), torch.cat(ens_ends), gold)}
        mi = (torch.cat(start_mi).clamp_min(0) + torch.cat(end_mi).clamp_min(0)) / 2
        for fi, ex_id in enumerate(features["example_id"]):
            by_example.setdefault(ex_id, []).append(float(mi[fi]))
    rows = []
    for i, (ex_id, answers) in enumerate(zip(examples["id"], examples["answers"])):
        row: dict[str, Any] = {"index": i, "id": ex_id, "answers": list(answers["text"]),
                               "single_prediction": single_text[ex_id]}
        if ens_text is not None:
            windows = by_example.get(ex_id, [0.0])
            row.update(ensemble_prediction=ens_text[ex_id],
                       uncertainty={"mutual_information": float(np.mean(windows)), "windows": len(windows)})
        rows.append(row)
    return EvalResult(single=single, ensemble=ens_metrics, rows=rows)
