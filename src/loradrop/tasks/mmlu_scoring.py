"""The MMLU scoring engine: the answer letters' next-token probabilities of many 0/5-shot prompts, in length-sorted
batches and, for questions of one subject, from one shared few-shot prefix per ensemble member (a repeated KV cache).
Split from `loradrop.tasks.mmlu` (data, prompts, metrics, evaluation)."""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..ensemble import _uncertainty, batch_seed, ensemble_score_choices, eval_mode
from ..members import split_members
from ..model import get_active_controller

# Padded prompt tokens per forward batch of the MMLU scoring (members multiply it in an ensemble pass): enough rows to
# amortise a forward call, few enough that the length-sorted batches carry little padding.
MMLU_TOKENS_PER_BATCH = 4096
# Questions of one subject whose prompts share at least this many leading tokens run that prefix once (KV cache).
MMLU_MIN_SHARED_PREFIX = 32


def length_batches(lengths: Sequence[int], group_size: int, max_tokens: int,
                   keys: Sequence[Any] | None = None) -> list[tuple[int, list[int]]]:
    """Forward batches as ``(group, row indices)``: the rows are cut into groups of `group_size` consecutive rows
    (the batches whose index seeds the ensemble members, `batch_seed`), each group is sorted by length and split so
    that a batch's padded size (rows x longest row) stays within `max_tokens` (a single longer row runs alone).
    A row's probabilities depend only on its group, never on which rows share its forward batch, so the results
    equal one left-padded batch per group while the padding shrinks to the length differences of neighbours.
    `keys` (e.g. the subjects): rows of different keys never share a batch (so a batch shares its few-shot
    prefix)."""
    batches = []
    for group, start in enumerate(range(0, len(lengths), group_size)):
        rows = sorted(range(start, min(start + group_size, len(lengths))),
                      key=lambda i: (keys[i] if keys is not None else 0, lengths[i], i))
        current: list[int] = []
        for i in rows:  # ascending length: the row being added is the longest so far
            if current and ((len(current) + 1) * lengths[i] > max_tokens
                            or (keys is not None and keys[i] != keys[current[0]])):
                batches.append((group, current))
                current = []
            current.append(i)
        if current:
            batches.append((group, current))
    return batches


def plan_tokens(token_ids: Sequence[Sequence[int]], *, batch_size: int, max_len: int, max_tokens: int | None = None,
                prefix_keys: Sequence[Any] | None = None) -> int:
    """Tokens that one pass of `score_choices` runs over these prompts (each batch's shared prefix once plus its
    padded questions, or its padded prompts), without running the model: the work an estimate multiplies."""
    ids_all = [list(seq[-max_len:]) for seq in token_ids]
    batches = length_batches([len(s) for s in ids_all], batch_size, max_tokens or MMLU_TOKENS_PER_BATCH, prefix_keys)
    return sum(_batch_tokens([ids_all[i] for i in rows], prefix_keys is not None)[1] for _, rows in batches)


def _batch_tokens(ids: Sequence[Sequence[int]], share: bool) -> tuple[int, int]:
    """(shared prefix length, or 0 when the batch runs as plain padded rows; tokens the batch runs per pass)."""
    shared = _common_prefix(ids) if share and len(ids) > 1 else 0
    if shared >= MMLU_MIN_SHARED_PREFIX:
        return shared, shared + len(ids) * max(len(s) - shared for s in ids)
    return 0, len(ids) * max(len(s) for s in ids)


@torch.no_grad()
def probe_seconds_per_token(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], *, rows: int = 4,
                            length: int = 128) -> float:
    """Seconds per prompt token of a single-pass forward over ``rows x length`` real prompt tokens, timed on the
    second of two identical calls (the first one of a process pays one-time costs: measured 5x slower on CPU): a
    cheap probe (2 x 512 tokens) for the estimate printed before a long MMLU run. A rough rate: the machine's load
    during the probe moves it."""
    device = next(model.parameters()).device
    chosen = sorted(token_ids, key=len)[-rows:]
    length = max(1, min(length, min(len(s) for s in chosen)))
    batch = torch.tensor([list(s[:length]) for s in chosen], device=device)
    with eval_mode(model):
        model(input_ids=batch)
        _synchronize(device)
        started = time.perf_counter()
        model(input_ids=batch)
        _synchronize(device)
    return (time.perf_counter() - started) / batch.numel()


def estimate_line(model: torch.nn.Module, token_sets: dict[int, Sequence[Sequence[int]]],
                  keys: dict[int, Sequence[Any]], *, batch_size: int, ensemble: int, max_len: int
                  ) -> tuple[str, dict[str, Any]]:
    """The line printed before MMLU scoring starts: questions x shot settings x passes, the tokens the plan runs
    (`plan_tokens`) and the time that takes at the rate of a probe forward (`probe_seconds_per_token`); plus the
    same numbers for the run's metadata."""
    passes = 1 + ensemble
    tokens = {shots: plan_tokens(ids, batch_size=batch_size, max_len=max_len, prefix_keys=keys[shots])
              for shots, ids in token_sets.items()}
    rate = probe_seconds_per_token(model, next(iter(token_sets.values())))
    seconds = {shots: rate * passes * t for shots, t in tokens.items()}
    n = len(next(iter(token_sets.values())))
    what = f"single pass + {ensemble} ensemble members" if ensemble else "single pass"
    per_setting = ", ".join(f"{shots}-shot {_duration(s)}" for shots, s in seconds.items())
    line = (f"MMLU estimate: {n} questions x {len(token_sets)} shot settings x {passes} passes ({what}) = "
            f"{n * len(token_sets) * passes:,} question passes, {passes * sum(tokens.values()):,} tokens to run; "
            f"probe {rate * 1e3:.2f} ms/token -> about {_duration(sum(seconds.values()))} ({per_setting}); "
            "--max-eval-samples N or a smaller --ensemble shortens it")
    record = {"seconds_per_token_probe": rate, "passes": passes, "tokens_per_pass": {f"mmlu_{k}shot": v
                                                                                     for k, v in tokens.items()},
              "estimated_seconds": {f"mmlu_{k}shot": round(v, 1) for k, v in seconds.items()}}
    return line, record


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def score_choices(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], choice_ids: list[int], *,
                  batch_size: int, ensemble: int, chunk_size: int | None, seed: int, max_len: int,
                  desc: str, token_ids: Sequence[Sequence[int]] | None = None,
                  max_tokens: int | None = None, timing: dict[str, Any] | None = None,
                  prefix_keys: Sequence[Any] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Choice probabilities of the single pass and the ensemble (plus its mutual information), in prompt order.

    `batch_size` consecutive questions share one ensemble seed (``batch_seed(seed, group)``, as before); within a
    group the questions run sorted by length in left-padded batches of at most `max_tokens` padded tokens
    (`MMLU_TOKENS_PER_BATCH`; `length_batches`), so padding no longer multiplies the cost. `token_ids`: the
    prompts already tokenized (untruncated). The progress bar counts questions; after the first batch an estimate
    of the whole pass (seconds per prompt token measured so far x the remaining tokens) is printed. `timing`, when
    given, receives ``seconds``, ``questions``, ``prompt_tokens`` and ``padded_tokens``.

    `prefix_keys` (the subjects): questions of one key share a batch, and a batch whose prompts share at least
    `MMLU_MIN_SHARED_PREFIX` leading tokens (the header and few-shot examples) runs that prefix once (per member)
    and only the questions on top of its KV cache (`_last_logits`)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep_last = "logits_to_keep" in inspect.signature(base.forward).parameters
    choices = torch.tensor(choice_ids)
    if token_ids is None:
        token_ids = tokenizer(list(prompts))["input_ids"]
    ids_all = [list(seq[-max_len:]) for seq in token_ids]
    lengths = [len(s) for s in ids_all]
    n = len(ids_all)
    batches = length_batches(lengths, batch_size, max_tokens or MMLU_TOKENS_PER_BATCH, prefix_keys)
    controller = get_active_controller(model, "MMLU ensemble scoring") if ensemble else None
    single = torch.empty(n, len(choice_ids))
    ens = torch.empty(n, len(choice_ids)) if ensemble else None
    mi = torch.empty(n) if ensemble else None
    total_tokens, done_tokens, padded = sum(lengths), 0, 0
    started = time.perf_counter()
    with eval_mode(model), tqdm(total=n, desc=desc, unit="question", leave=False) as bar:
        for k, (group, rows) in enumerate(batches):
            ids = [ids_all[i] for i in rows]
            index = torch.tensor(rows)
            shared, tokens = _batch_tokens(ids, prefix_keys is not None)
            padded += tokens
            if shared:
                prefix, suffixes = ids[0][:shared], [s[shared:] for s in ids]
                logits = _last_logits(model, prefix, suffixes, pad_id, device, keep_last)
                single[index] = logits[:, choices.to(logits.device)].float().softmax(-1).cpu()
                if ensemble:
                    key, parts = controller.ensemble_key(batch_seed(seed, group)), []
                    for offset in range(0, ensemble, chunk_size or ensemble):
                        members = min(chunk_size or ensemble, ensemble - offset)
                        logits = _last_logits(model, prefix, suffixes, pad_id, device, keep_last,
                                              lambda o=offset, m=members, k=key: controller.ensemble(k, m, o))
                        parts.append(split_members(logits, members)[..., choices.to(logits.device)].float()
                                     .softmax(-1))
                    probs, _, _, mutual_information = _uncertainty(torch.cat(parts))
                    ens[index] = probs.float().cpu()
                    mi[index] = mutual_information.float().cpu()
            else:
                width = max(len(s) for s in ids)
                input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in ids])
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
                kwargs = {"logits_to_keep": 1} if keep_last else {}
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs).logits
                single[index] = logits[:, -1, choices.to(logits.device)].float().softmax(-1).cpu()
                if ensemble:
                    out = ensemble_score_choices(model, input_ids, choice_ids, ensemble, attention_mask=mask,
                                                 chunk_size=chunk_size, seed=batch_seed(seed, group))
                    ens[index] = out.probs.float().cpu()
                    mi[index] = out.mutual_information.float().cpu()
            bar.update(len(rows))
            done_tokens += sum(lengths[i] for i in rows)
            if k == 0 and len(batches) > 1:
                elapsed = time.perf_counter() - started
                estimate = elapsed / max(done_tokens, 1) * total_tokens
                passes = f"1 + {ensemble} ensemble members" if ensemble else "single pass"
                tqdm.write(f"{desc}: {n} questions, {total_tokens} prompt tokens ({passes}); first batch "
                           f"{elapsed:.1f} s -> estimated {_duration(estimate)} for this setting "
                           f"({estimate / n:.2f} s/question)", file=sys.stderr)
    if timing is not None:
        timing.update(seconds=time.perf_counter() - started, questions=n, prompt_tokens=total_tokens,
                      padded_tokens=padded, forward_batches=len(batches))
    return single, ens, mi


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Leading tokens shared by every sequence, leaving each at least one token of its own."""
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for j in range(limit):
        if any(s[j] != first[j] for s in seqs[1:]):
            return j
    return max(limit, 0)


def _last_logits(model: torch.nn.Module, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], pad_id: int,
                 device: torch.device, keep_last: bool, context: Any = contextlib.nullcontext) -> torch.Tensor:
    """Next-token logits after ``prefix + suffix`` for every suffix, ``(rows, V)`` (members x rows in an ensemble
    `context`, member-major): the prefix runs once and its KV cache is repeated for the suffixes, which are
    left-padded between prefix and question (masked out, with explicit positions so RoPE sees no gap)."""
    kwargs = {"logits_to_keep": 1} if keep_last else {}
    with context():
        cache = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True, **kwargs).past_key_values
    cache.batch_repeat_interleave(len(suffixes))
    start, width = len(prefix), max(len(s) for s in suffixes)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in suffixes])
    mask = torch.tensor([[1] * start + [0] * (width - len(s)) + [1] * len(s) for s in suffixes])
    positions = torch.tensor([[start] * (width - len(s)) + list(range(start, start + len(s))) for s in suffixes])
    with context():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       past_key_values=cache, use_cache=True, **kwargs).logits
    return logits[:, -1]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
