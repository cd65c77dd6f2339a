"""Scheduling a sweep's runs on shared GPUs: how much memory and time each run will take, from the runs of the same
results folder that finished, and an admission gate that keeps the runs on one GPU within a memory budget.

Many small runs share one large GPU well (a 135M-parameter model leaves an H200 mostly idle), until their peaks add
up past the card: then runs die with CUDA out-of-memory errors partway through, and their time is lost. With
``loradrop sweep --gpu-memory GIB``, each worker reserves its run's estimated memory on its GPU before the run starts
and gives it back when it ends; a run that does not fit waits for others to finish. The estimate of a run is

- the largest peak (``peak_memory_mib.cuda``, PyTorch's allocated peak) of a finished run of the same task and
  method in the results folder, else
- the smallest peak of the task's finished runs under other methods, each divided by its members per step (LoRA
  Dropout's ``samples``, at most ``chunk_size``), times this run's (N masks per step cost about N times the activation
  memory of one; the wall time is the task's longest, unscaled: the members of a step run as one batched pass), else
- unknown: an even share of the budget (budget / workers on that GPU), as without the gate;

plus `OVERHEAD_GIB` for the CUDA context and allocator slack, times `SLACK`. A reservation larger than the budget is
cut to the budget (the run then has the GPU to itself). Waiting runs are admitted as soon as they fit, in any order
(backfilling, so a large run does not hold the small ones behind it); a run that has waited `PATIENCE_S` seconds stops
the others from starting until it fits, so it cannot be starved. The same finished runs give each run an expected
wall time; the sweep starts the longest first (an interrupted call then loses the short runs, not the long ones).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OVERHEAD_GIB = 1.0  # per process: the CUDA context (~0.5 GiB with torch 2.x) and the caching allocator's slack
SLACK = 1.15  # measured peaks vary a little with the batches' lengths; a run is estimated from other lrs and seeds
PATIENCE_S = 120.0  # a run waiting this long for memory is served before any later one


@dataclass(frozen=True)
class Estimate:
    """A run's expected peak GPU memory (GiB, allocated tensors) and wall time (s), None when nothing is known."""

    memory_gib: float | None
    seconds: float | None
    source: str  # "measured" (same task and method), "scaled" (same task, other methods) or "unknown"


def members_per_step(settings: Mapping[str, Any]) -> int:
    """How many masked copies of the activations one training step holds: LoRA Dropout's ``samples`` (cut to
    ``chunk_size`` when members are chunked), 1 for everything else."""
    if settings.get("no_lora_dropout") or not settings.get("p", 0.5):
        return 1
    samples = int(settings.get("samples") or 1)
    chunk = settings.get("chunk_size")
    return max(1, min(samples, int(chunk)) if chunk else samples)


def measured_runs(results: Path) -> list[dict[str, Any]]:
    """(task, method, members per step, peak GiB, wall s) of every successful result in `results` that recorded them."""
    out = []
    for path in sorted(Path(results).glob("*.json")) if Path(results).is_dir() else []:
        if path.name.endswith(".failed.json"):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or data.get("status") != "ok":
            continue
        settings = data.get("settings") or {}
        peak = (data.get("peak_memory_mib") or {}).get("cuda")
        wall = data.get("wall_time_s")
        out.append({"task": settings.get("task"), "method": data.get("method"), "members": members_per_step(settings),
                    "memory_gib": peak / 1024 if isinstance(peak, (int, float)) and peak > 0 else None,
                    "seconds": wall if isinstance(wall, (int, float)) and wall > 0 else None})
    return out


def estimate(task: Any, method: str, settings: Mapping[str, Any], measured: Iterable[Mapping[str, Any]]) -> Estimate:
    """The estimate of one run (see the module docstring)."""
    same_task = [m for m in measured if m["task"] == task]
    same = [m for m in same_task if m["method"] == method]
    memory = [m["memory_gib"] for m in same if m["memory_gib"]]
    seconds = [m["seconds"] for m in same if m["seconds"]]
    if memory or seconds:
        return Estimate(max(memory) if memory else None, max(seconds) if seconds else None, "measured")
    members = members_per_step(settings)
    memory = [m["memory_gib"] / m["members"] * members for m in same_task if m["memory_gib"]]
    seconds = [m["seconds"] for m in same_task if m["seconds"]]  # members share a batched pass: not N times longer
    if memory or seconds:
        return Estimate(min(memory) if memory else None, max(seconds) if seconds else None, "scaled")
    return Estimate(None, None, "unknown")


def reservation(estimate_: Estimate, budget_gib: float, share_gib: float) -> float:
    """GiB to reserve for a run: its estimate with overhead and slack, an even share when unknown; at most the
    budget."""
    if estimate_.memory_gib is None:
        return min(budget_gib, share_gib)
    return min(budget_gib, (estimate_.memory_gib + OVERHEAD_GIB) * SLACK)


def longest_first(keys: list[str], seconds: Mapping[str, float | None]) -> list[str]:
    """`keys` with the longest expected runs first; unknown ones before the known (they may be long), order kept
    among equals."""
    return sorted(keys, key=lambda k: (seconds.get(k) is not None, -(seconds.get(k) or 0.0)))


def admissible(need: float, used: float, budget: float, me: int, waiting: Mapping[int, float], now: float,
               patience: float = PATIENCE_S) -> bool:
    """Whether the run of worker `me`, needing `need` GiB, may start on a GPU with `used` of `budget` GiB reserved,
    while `waiting` (worker -> since when) wait for the same GPU: it fits (or the GPU is free), and no other run has
    waited past `patience` longer than it has."""
    overdue = [(since, w) for w, since in waiting.items() if now - since >= patience]
    if overdue and min(overdue)[1] != me:
        return False
    return used == 0 or used + need <= budget + 1e-9


class MemoryGate:
    """Memory reservations per GPU, shared by a pool's worker processes (multiprocessing primitives of one context,
    handed to the workers when the pool starts). ``with gate.reserve(gpu, gib):`` blocks until the run fits."""

    def __init__(self, context: Any, gpus: list[int], budget_gib: float, slots: int) -> None:
        self.budget = float(budget_gib)
        self.gpus = list(gpus)
        self.slots = slots
        self._cond = context.Condition()
        self._used = context.Array("d", len(self.gpus))
        self._since = context.Array("d", slots * len(self.gpus))  # waiting since (0: not waiting), per worker slot

    def reserve(self, gpu: int, gib: float, slot: int) -> _Reservation:
        return _Reservation(self, self.gpus.index(gpu) if gpu in self.gpus else 0, min(gib, self.budget),
                            slot % self.slots)

    def _waiting(self, g: int) -> dict[int, float]:
        base = g * self.slots
        return {s: self._since[base + s] for s in range(self.slots) if self._since[base + s] > 0}

    def _acquire(self, g: int, gib: float, slot: int) -> None:
        with self._cond:
            self._since[g * self.slots + slot] = time.time()
            while not admissible(gib, self._used[g], self.budget, slot, self._waiting(g), time.time()):
                self._cond.wait(timeout=5.0)  # re-checked at least every 5 s: patience is a matter of time
            self._since[g * self.slots + slot] = 0.0
            self._used[g] += gib
            self._cond.notify_all()

    def _release(self, g: int, gib: float) -> None:
        with self._cond:
            self._used[g] = max(0.0, self._used[g] - gib)
            self._cond.notify_all()

    def used(self, gpu: int) -> float:
        return self._used[self.gpus.index(gpu) if gpu in self.gpus else 0]


class _Reservation:
    def __init__(self, gate: MemoryGate, g: int, gib: float, slot: int) -> None:
        self.gate, self.g, self.gib, self.slot = gate, g, gib, slot

    def __enter__(self) -> _Reservation:
        self.gate._acquire(self.g, self.gib, self.slot)
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate._release(self.g, self.gib)


def check_budget(gpu_memory_gib: Any) -> float:
    """A valid ``--gpu-memory`` value (GiB > 0, finite), or ValueError naming it."""
    if isinstance(gpu_memory_gib, bool) or not isinstance(gpu_memory_gib, (int, float)) \
            or not math.isfinite(gpu_memory_gib) or gpu_memory_gib <= 0:
        raise ValueError(f"gpu memory budget must be a number of GiB > 0, got {gpu_memory_gib!r}")
    return float(gpu_memory_gib)


__all__ = ["OVERHEAD_GIB", "PATIENCE_S", "SLACK", "Estimate", "MemoryGate", "admissible", "check_budget", "estimate",
           "longest_first", "measured_runs", "members_per_step", "reservation"]
