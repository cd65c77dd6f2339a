"""Test-time ensembles of masked members in one batched pass, with uncertainty.

The n members differ only by masks on the small A and B weights, so all of them (or `chunk_size` at a time) run in
one forward call on the batch repeated member-major: the frozen weights are read once for all members.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .members import BATCH_KEYS, split_members
from .model import get_active_controller, get_controller

_LABEL_KEYS = ("labels", "label", "start_positions", "end_positions")


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) along `dim`, with 0 log 0 = 0, in the dtype of `probs` (pass float64 for reports)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim)


def batch_seed(seed: int, batch_index: int) -> int:
    """The ensemble seed of one batch of an evaluation run with seed `seed`: distinct, reproducible members per
    batch (the seed folded with the batch index), so the run does not reuse one set of masks for every batch."""
    return seed * 1_000_003 + batch_index


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with `model` in ``eval()`` and restore its previous train/eval mode afterwards, also on error.

    (Module mode only; which update a LoRA Dropout model uses in eval is `loradrop.set_eval_mode`.)
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class EnsembleOutput:
    """Averaged predictions of n masked members.

    kind "classification": `probs` (B, [T,] C) is the mean of the members' softmax probabilities, `member_probs` is
    (n, B, [T,] C); `entropy` is the entropy of the mean, `expected_entropy` the mean member entropy, and
    `mutual_information` their difference (the epistemic part). kind "regression": `mean`, `std` and
    `member_values` (n, B). kind "span": averaged `start_probs`/`end_probs` (B, T), their members, and the best
    legal span (`span_start`, `span_end`, `span_score`) read from the averaged distributions.
    """

    n: int
    kind: str
    probs: torch.Tensor | None = None
    member_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    expected_entropy: torch.Tensor | None = None
    mutual_information: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    member_values: torch.Tensor | None = None
    start_probs: torch.Tensor | None = None
    end_probs: torch.Tensor | None = None
    member_start_probs: torch.Tensor | None = None
    member_end_probs: torch.Tensor | None = None
    span_start: torch.Tensor | None = None
    span_end: torch.Tensor | None = None
    span_score: torch.Tensor | None = None

    @property
    def predictions(self) -> torch.Tensor:
        """Class ids (classification), means (regression) or (start, end) pairs (span)."""
        if self.kind == "classification":
            return self.probs.argmax(-1)
        if self.kind == "regression":
            return self.mean
        return torch.stack([self.span_start, self.span_end], dim=-1)


@dataclass
class ChoiceOutput:
    """Multiple-choice scores: probabilities over the K options averaged over n members."""

    n: int
    probs: torch.Tensor  # (B, K)
    member_probs: torch.Tensor  # (n, B, K)
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        return self.probs.argmax(-1)


# ------------------------------------------------------------------------------------------------ helpers
def _check_n(n: Any, chunk_size: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (ensemble size) must be an integer >= 1, got {n!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")


def _model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of model inputs (a tokenizer output), got {type(batch).__name__}")
    if not any(isinstance(batch.get(k), torch.Tensor) for k in BATCH_KEYS):
        raise ValueError(f"batch has none of the model's inputs {list(BATCH_KEYS)}; got keys {sorted(batch)}")
    device = _model_device(model)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k not in _LABEL_KEYS}


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _chunks(n: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    step = n if chunk_size is None else min(chunk_size, n)
    for offset in range(0, n, step):
        yield offset, min(step, n - offset)


# ------------------------------------------------------------------------------------------------ automatic chunks
MEMORY_FRACTION = 0.5  # of the available memory, for one chunk's activations and masks
ACTIVATION_WIDTHS = 4  # activations of the widest size alive at once, per token, in a no_grad forward
MASK_BYTES = 32  # per member and mask feature: the float mask and the int64 temporaries of its hash


_CUDA_BUDGET: int | None = None  # bytes of allocated CUDA tensors this process keeps to (`cuda_memory_budget`)


@contextlib.contextmanager
def cuda_memory_budget(nbytes: int | None) -> Iterator[None]:
    """While the context lasts, the automatic chunking (`available_memory`) counts at most `nbytes` of allocated CUDA
    tensors as this process's, however much the card has free. For processes sharing one GPU (a sweep's workers,
    each having reserved its share): sized from the whole card's free memory, one process's ensemble pass would take
    the room the others' runs grow into, and they would run out of memory. None: no budget. Nothing is enforced:
    only the chunk sizes follow it (a single member larger than the budget still runs)."""
    global _CUDA_BUDGET
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"nbytes must be None or an integer >= 0, got {nbytes!r}")
    before, _CUDA_BUDGET = _CUDA_BUDGET, nbytes
    try:
        yield
    finally:
        _CUDA_BUDGET = before


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: CUDA: the driver's free memory plus what torch's caching allocator
    holds unused (``torch.cuda.mem_get_info``), at most what `cuda_memory_budget` leaves; CPU:
    ``psutil.virtual_memory().available`` when psutil is installed, else ``MemAvailable`` of /proc/meminfo; None where
    unknown (then nothing is chunked automatically)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        card = int(free + torch.cuda.memory_reserved(device) - allocated)
        return card if _CUDA_BUDGET is None else max(0, min(card, _CUDA_BUDGET - allocated))
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024  # in kB
    except (OSError, KeyError, ValueError, IndexError):
        return None


def member_bytes(model: nn.Module, inputs: Mapping[str, Any]) -> int:
    """Estimated peak memory of ONE member in a no_grad forward: tokens x the widest activation (hidden,
    intermediate, attention scores heads x seq, output head, adapted layers' features) x bytes x
    `ACTIVATION_WIDTHS`, plus the member's masks (`MASK_BYTES` per mask feature; per input element for "input")."""
    value = next(inputs[k] for k in BATCH_KEYS if isinstance(inputs.get(k), torch.Tensor))
    tokens = value.numel() // value.shape[-1] if value.is_floating_point() and value.dim() > 2 else value.numel()
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    widths = [getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None),
              heads * value.shape[1] if isinstance(heads, int) and value.dim() > 1 else None,
              getattr(head, "out_features", None)]
    controller = get_controller(model)
    dims = [handler.dims(module, adapter)[:2] for module, adapter, handler in controller.layers]
    widths += [d for pair in dims for d in pair]
    width = max([w for w in widths if isinstance(w, int)], default=1)
    element = max(4, next((p.element_size() for p in model.parameters()), 4))  # outputs are copied as float32
    masks = controller.num_features * MASK_BYTES
    if controller.config.strategy == "input":
        masks += tokens * max((d[0] for d in dims), default=0) * MASK_BYTES
    return tokens * width * element * ACTIVATION_WIDTHS + masks


def auto_chunk_size(model: nn.Module, inputs: Mapping[str, Any], n: int) -> int:
    """Members per forward call when ``chunk_size=None``: all `n` when they fit in `MEMORY_FRACTION` of the
    available memory by the `member_bytes` estimate, else as many as fit (at least 1)."""
    available = available_memory(_model_device(model))
    if available is None:
        return n
    return max(1, min(n, int(available * MEMORY_FRACTION) // max(1, member_bytes(model, inputs))))


def _run_chunks(model: nn.Module, inputs: Mapping[str, Any], n: int, chunk_size: int | None,
                run: Callable[[int, int], None]) -> None:
    """Call ``run(offset, members)`` over members 0..n-1: `chunk_size` at a time, or automatically sized
    (`auto_chunk_size`; on CUDA re-sized from the measured peak of a chunk, and halved after an out-of-memory
    error). Chunking never changes a member, so the results equal the unchunked run."""
    if chunk_size is not None:
        for offset, members in _chunks(n, chunk_size):
            run(offset, members)
        return
    device = _model_device(model)
    size, offset = auto_chunk_size(model, inputs, n), 0
    while offset < n:
        members = min(size, n - offset)
        cuda = device.type == "cuda"
        if cuda:
            before, peak_before = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
        try:
            run(offset, members)
        except torch.cuda.OutOfMemoryError:
            if members == 1 or not cuda:
                raise
            size = members // 2  # the same members again, fewer at a time
            torch.cuda.empty_cache()
            continue
        offset += members
        if cuda and offset < n and torch.cuda.max_memory_allocated(device) > peak_before:
            # this chunk set the peak, so its cost is measured rather than estimated
            per_member = (torch.cuda.max_memory_allocated(device) - before) / members
            size = max(1, int(available_memory(device) * MEMORY_FRACTION / max(per_member, 1.0)))


def _uncertainty(member_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = member_probs.mean(0)
    total = entropy(probs)
    expected = entropy(member_probs).mean(0)
    return probs, total, expected, (total - expected).clamp_min(0.0)


def best_spans(start_probs: torch.Tensor, end_probs: torch.Tensor, *, max_answer_length: int = 30,
               allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (start, end) maximising p_start * p_end with start <= end < start + max_answer_length.

    `allowed` (B, T) bool marks positions that may hold the answer (e.g. context tokens).
    """
    seq = start_probs.shape[-1]
    log_s = torch.log(start_probs.clamp_min(1e-30))
    log_e = torch.log(end_probs.clamp_min(1e-30))
    if allowed is not None:
        log_s = log_s.masked_fill(~allowed, float("-inf"))
        log_e = log_e.masked_fill(~allowed, float("-inf"))
    scores = log_s[:, :, None] + log_e[:, None, :]  # (B, T, T)
    idx = torch.arange(seq, device=scores.device)
    legal = (idx[None, :] >= idx[:, None]) & (idx[None, :] < idx[:, None] + max_answer_length)
    scores = scores.masked_fill(~legal, float("-inf"))
    flat = scores.flatten(1).argmax(-1)
    start, end = flat // seq, flat % seq
    return start, end, scores.flatten(1).gather(1, flat[:, None]).squeeze(1).exp()


# ------------------------------------------------------------------------------------------------ public API
@torch.no_grad()
def ensemble_predict(
    model: nn.Module,
    batch: Mapping[str, Any],
    n: int,
    *,
    chunk_size: int | None = None,
    seed: int | None = None,
    max_answer_length: int = 30,
    span_mask: torch.Tensor | None = None,
) -> EnsembleOutput:
    """Average the predictions of `n` masked members of a LoRA Dropout model, in batched passes.

    Args:
        model: a PEFT model that `apply_lora_dropout` was applied to (classification, regression or QA head).
        batch: the model inputs (labels are ignored).
        n: ensemble size.
        chunk_size: run at most this many members per forward call (bounds memory); results equal the unchunked
            run because every member's masks depend only on its index. None: all n in one call when they fit in
            half the free memory, else chunks sized from it (`auto_chunk_size`); ``chunk_size=n`` forces one call.
        seed: the same seed gives the same members; None draws a fresh ensemble.
        max_answer_length, span_mask: span selection for extractive QA heads.
    """
    _check_n(n, chunk_size)
    controller = get_active_controller(model, "ensemble_predict")
    inputs = _model_inputs(model, batch)
    key = controller.ensemble_key(seed)
    outputs: dict[str, list[torch.Tensor]] = {}
    out = None

    def run(offset: int, members: int) -> None:
        nonlocal out
        with controller.ensemble(key, members, offset):
            out = model(**inputs)
        for name in ("start_logits", "end_logits", "logits"):
            value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
            if isinstance(value, torch.Tensor):
                outputs.setdefault(name, []).append(split_members(value.float(), members))

    with eval_mode(model):
        _run_chunks(model, inputs, n, chunk_size, run)
    if "start_logits" in outputs:
        member_s = torch.cat(outputs["start_logits"]).softmax(-1)
        member_e = torch.cat(outputs["end_logits"]).softmax(-1)
        start_probs, end_probs = member_s.mean(0), member_e.mean(0)
        s, e, score = best_spans(start_probs, end_probs, max_answer_length=max_answer_length, allowed=span_mask)
        return EnsembleOutput(n=n, kind="span", start_probs=start_probs, end_probs=end_probs,
                              member_start_probs=member_s, member_end_probs=member_e,
                              span_start=s, span_end=e, span_score=score)
    if "logits" not in outputs:
        raise ValueError(f"the model output has no logits (got {type(out).__name__}); cannot ensemble it")
    logits = torch.cat(outputs["logits"])  # (n, B, ..., C)
    config = getattr(model, "config", None)
    if logits.shape[-1] == 1 or getattr(config, "problem_type", None) == "regression":
        values = logits.squeeze(-1)
        return EnsembleOutput(n=n, kind="regression", mean=values.mean(0),
                              std=values.std(0, unbiased=False), member_values=values)
    member_probs = logits.softmax(-1)
    probs, total, expected, mi = _uncertainty(member_probs)
    return EnsembleOutput(n=n, kind="classification", probs=probs, member_probs=member_probs, entropy=total,
                          expected_entropy=expected, mutual_information=mi)


def _last_positions(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    seq = attention_mask.shape[1]
    # index of the last attended token, for left and right padding alike
    return seq - 1 - attention_mask.flip(-1).long().argmax(-1)


def _accepts(model: nn.Module, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def ensemble_score_choices(
    model: nn.Module,
    input_ids: torch.Tensor,
    choice_token_ids: list[int] | torch.Tensor,
    n: int,
    *,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    seed: int | None = None,
) -> ChoiceOutput:
    """Multiple-choice scoring for causal LMs (MMLU style).

    Each member's next-token distribution after the prompt is restricted to the K `choice_token_ids` (e.g. the
    tokens of " A", " B", " C", " D") and renormalised; the members' choice probabilities are averaged.
    `chunk_size` as in `ensemble_predict` (None: sized automatically).
    """
    _check_n(n, chunk_size)
    controller = get_active_controller(model, "ensemble_score_choices")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, seq) tensor of prompt token ids")
    device = _model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    choices = torch.as_tensor(choice_token_ids, device=device, dtype=torch.long)
    if choices.dim() != 1 or choices.numel() < 2:
        raise ValueError(f"choice_token_ids must list at least two token ids, got {choice_token_ids!r}")
    last = _last_positions(attention_mask, input_ids)
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    # With left padding (or none) only the last position is needed: skip the full (members*B, T, V) logits.
    only_last = bool((last == input_ids.shape[1] - 1).all()) and _accepts(model, "logits_to_keep")
    if only_last:
        kwargs["logits_to_keep"] = 1
    key = controller.ensemble_key(seed)
    parts = []

    def run(offset: int, members: int) -> None:
        with controller.ensemble(key, members, offset):
            logits = model(**kwargs).logits
        logits = split_members(logits, members)  # (m, B, T', V)
        rows = torch.arange(input_ids.shape[0], device=device)
        pos = torch.full_like(last, logits.shape[2] - 1) if only_last else last
        picked = logits[:, rows, pos][..., choices].float()  # (m, B, K)
        parts.append(picked.softmax(-1))

    with eval_mode(model):
        _run_chunks(model, kwargs, n, chunk_size, run)
    member_probs = torch.cat(parts)
    probs, total, expected, mi = _uncertainty(member_probs)
    return ChoiceOutput(n=n, probs=probs, member_probs=member_probs, entropy=total, expected_entropy=expected,
                        mutual_information=mi)
