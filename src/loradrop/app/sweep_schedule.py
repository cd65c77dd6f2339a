"""Scheduling a sweep's runs on shared GPUs: how much memory and time each run will take, from the runs of the same
results folder that finished, and an admission gate that keeps the runs on one GPU within a memory budget.

Many small runs share one large GPU well (a 135M-parameter model leaves an H200 mostly idle), until their peaks add
up past the card: then runs die with CUDA out-of-memory errors partway through, and their time is lost. With
``loradrop sweep --gpu-memory GIB``, each worker reserves its run's estimated memory on its GPU before the run starts
and gives it back when it ends; a run that does not fit waits for others to finish. The estimate of a run is

- the largest peak (``peak_memory_mib.cuda``, PyTorch's allocated peak) of a finished run of the same task and
  method in the results folder (per member of a step, times this run's members), else
- the smallest peak of the task's finished runs under other methods, each divided by its members per step (LoRA
  Dropout's ``samples``, at most ``chunk_size``), times this run's (N masks per step cost about N times the activation
  memory of one; the wall time is the task's longest, unscaled by members, as the members of a step run as one
  batched pass, but times the method's median ratio, on the tasks where both ran, to the methods measured on this
  task), else
- the largest peak per member of the other tasks' finished runs, times this run's members, but never less than an
  even share of the budget: a task not run yet (the plan's tasks share their model and most settings, but not their
  sequence lengths, hence the largest; LIMA's first LoRA Dropout runs, at an even share, ran out of memory beside
  Alpaca's on the H200), else
- unknown: an even share of the budget (budget / workers on that GPU), as without the gate;

plus `OVERHEAD_GIB` for the CUDA context and allocator slack, times `SLACK`. A reservation larger than the budget is
cut to the budget (the run then has the GPU to itself). Waiting runs are admitted as soon as they fit, in any order
(backfilling, so a large run does not hold the small ones behind it); a run that has waited `PATIENCE_S` seconds stops
the others from starting until it fits, so it cannot be starved. A worker that dies gives its reservation back.
The same finished runs give each run an expected wall time; the sweep starts the longest first (an interrupted call
then loses the short runs, not the long ones).

Two sweeps sharing a GPU (two plans at once on one machine) each see only their own pool's reservations, so their
runs' peaks can add up past the card; with ``--gpu-gate FILE`` (`SharedMemoryGate`) they reserve from one table in
that file instead, with the same rule, one budget per GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runfolder import pid_alive

OVERHEAD_GIB = 1.0  # per process: the CUDA context (~0.5 GiB with torch 2.x) and the caching allocator's slack
SLACK = 1.15  # measured peaks vary a little with the batches' lengths; a run is estimated from other lrs and seeds
PATIENCE_S = 120.0  # a run waiting this long for memory is served before any later one


@dataclass(frozen=True)
class Estimate:
    """A run's expected peak GPU memory (GiB, allocated tensors) and wall time (s), None when nothing is known."""

    memory_gib: float | None
    seconds: float | None
    source: str  # "measured" (same task and method), "scaled" (same task, other methods), "other tasks" or "unknown"


def members_per_step(settings: Mapping[str, Any]) -> int:
    """How many masked copies of the activations one training step holds: LoRA Dropout's ``samples`` (cut to
    ``chunk_size`` when members are chunked), 1 for everything else."""
    if settings.get("no_lora_dropout") or not settings.get("p", 0.5):
        return 1
    samples = int(settings.get("samples") or 1)
    chunk = settings.get("chunk_size")
    return max(1, min(samples, int(chunk)) if chunk else samples)


def measured_runs(results: Path) -> list[dict[str, Any]]:
    """(task, method, members per step, peak GiB, wall s; for a resumed run its summed wall s apart) of every successful
    result in `results` that recorded them."""
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
        # a resumed run's wall time sums its attempts (each reloading the model, losing the steps after its last
        # checkpoint): an upper bound on one run's time, used only where no run was measured in one go
        wall = data.get("wall_time_s")
        resumed = bool(data.get("attempts"))
        out.append({"task": settings.get("task"), "method": data.get("method"), "members": members_per_step(settings),
                    "memory_gib": peak / 1024 if isinstance(peak, (int, float)) and peak > 0 else None,
                    "seconds": wall if isinstance(wall, (int, float)) and wall > 0 and not resumed else None,
                    "seconds_resumed": wall if isinstance(wall, (int, float)) and wall > 0 and resumed else None})
    return out


def method_time_ratio(method: str, task: Any, measured: Sequence[Mapping[str, Any]]) -> float:
    """How much longer `method` runs than the methods measured on `task` (the longest of them), as the median over
    the other tasks where `method` and some of those methods ran in one go (1 where none did): MC dropout's
    sequential test passes, or LoRA Dropout's N members, make a run longer than plain LoRA's, which the task's own
    runs of other methods alone would not show."""
    known = {m["method"] for m in measured if m["task"] == task and m["method"] != method and m["seconds"]}
    ratios = []
    for other in sorted({str(m["task"]) for m in measured} - {str(task)}):
        mine = [m["seconds"] for m in measured if m["task"] == other and m["method"] == method and m["seconds"]]
        base = [m["seconds"] for m in measured if m["task"] == other and m["method"] in known and m["seconds"]]
        if mine and base:
            ratios.append(max(mine) / max(base))
    return float(statistics.median(ratios)) if ratios else 1.0


def estimate(task: Any, method: str, settings: Mapping[str, Any], measured: Iterable[Mapping[str, Any]]) -> Estimate:
    """The estimate of one run (see the module docstring)."""
    measured = list(measured)
    same_task = [m for m in measured if m["task"] == task]
    same = [m for m in same_task if m["method"] == method]
    members = members_per_step(settings)
    # the same method may have a local samples axis (e.g. samples: [1, 4]): its peaks scale with members too
    memory = [m["memory_gib"] / m["members"] * members for m in same if m["memory_gib"]]
    seconds = [m["seconds"] for m in same if m["seconds"]]
    task_memory = [m["memory_gib"] / m["members"] * members for m in same_task if m["memory_gib"]]
    task_seconds = [m["seconds"] for m in same_task if m["seconds"] and m["method"] != method]
    # each falls back on its own: the same method's runs may all be resumed ones (a peak, and only an upper bound on
    # the time, the shortest of which is closer than another method's time)
    upper = [m["seconds_resumed"] for m in same if m.get("seconds_resumed")]
    task_upper = [m["seconds_resumed"] for m in same_task if m.get("seconds_resumed")]
    # (members share a batched pass: not N times longer; another method's time is scaled by `method_time_ratio`)
    time_s = max(seconds) if seconds else min(upper) if upper else \
        max(task_seconds) * method_time_ratio(method, task, measured) if task_seconds else \
        min(task_upper) if task_upper else None
    if memory or task_memory:
        return Estimate(max(memory) if memory else min(task_memory), time_s,
                        "measured" if memory or seconds or upper else "scaled")
    other_memory = [m["memory_gib"] / m["members"] * members for m in measured if m["task"] != task and m["memory_gib"]]
    source = "other tasks" if other_memory else "measured" if seconds or upper else "scaled" if time_s else "unknown"
    return Estimate(max(other_memory) if other_memory else None, time_s, source)


def reservation(estimate_: Estimate, budget_gib: float, share_gib: float) -> float:
    """GiB to reserve for a run: its estimate with overhead and slack (at least an even share when it comes from
    other tasks), an even share when unknown; at most the budget."""
    if estimate_.memory_gib is None:
        return min(budget_gib, share_gib)
    need = (estimate_.memory_gib + OVERHEAD_GIB) * SLACK
    return min(budget_gib, max(need, share_gib) if estimate_.source == "other tasks" else need)


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
    handed to the workers when the pool starts). ``with gate.reserve(gpu, gib):`` blocks until the run fits.

    A table of entries (state, GPU, GiB, process id, waiting since) under one lock, polled: a worker that dies
    (killed by the host, a crash) cannot wedge the others, because an entry whose process is gone is dropped at the
    next look, and nobody waits on a notification a dead process would have to acknowledge (as a `Condition` does)."""

    FREE, WAITING, HOLDING = 0, 1, 2
    POLL_S = 0.5

    def __init__(self, context: Any, gpus: list[int], budget_gib: float, workers: int) -> None:
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"the gate's GPUs must be distinct, got {gpus}")
        self.budget = float(budget_gib)
        self.gpus = list(gpus)
        size = 4 * max(1, workers)  # an entry per waiting or holding process: every worker, replacements included
        self._lock = context.Lock()
        self._state = context.Array("i", size, lock=False)
        self._gpu = context.Array("i", size, lock=False)
        self._pid = context.Array("i", size, lock=False)
        self._gib = context.Array("d", size, lock=False)
        self._since = context.Array("d", size, lock=False)

    def reserve(self, gpu: int, gib: float) -> _Reservation:
        return _Reservation(self, self.gpus.index(gpu) if gpu in self.gpus else 0, min(gib, self.budget))

    def _drop_dead(self) -> None:
        for i, pid in enumerate(self._pid):
            if self._state[i] != self.FREE and not pid_alive(pid):
                self._state[i] = self.FREE

    def _used(self, g: int) -> float:
        return sum(self._gib[i] for i in range(len(self._state)) if self._state[i] == self.HOLDING
                   and self._gpu[i] == g)

    def _acquire(self, g: int, gib: float) -> int:
        with self._lock:
            self._drop_dead()
            entry = next((i for i, state in enumerate(self._state) if state == self.FREE), None)
            if entry is None:
                raise RuntimeError("the memory gate has no free entry (more live workers than it was sized for)")
            self._state[entry], self._gpu[entry], self._gib[entry] = self.WAITING, g, gib
            self._pid[entry], self._since[entry] = os.getpid(), time.time()
        try:
            while True:
                with self._lock:
                    self._drop_dead()
                    waiting = {i: self._since[i] for i in range(len(self._state))
                               if self._state[i] == self.WAITING and self._gpu[i] == g}
                    if admissible(gib, self._used(g), self.budget, entry, waiting, time.time()):
                        self._state[entry] = self.HOLDING
                        return entry
                time.sleep(self.POLL_S)
        except BaseException:  # interrupted while waiting: leave no entry behind
            with self._lock:
                self._state[entry] = self.FREE
            raise

    def _release(self, entry: int) -> None:
        with self._lock:
            self._state[entry] = self.FREE

    def used(self, gpu: int) -> float:
        with self._lock:
            return self._used(self.gpus.index(gpu) if gpu in self.gpus else 0)


class _Reservation:
    def __init__(self, gate: MemoryGate | SharedMemoryGate, g: int, gib: float) -> None:
        self.gate, self.g, self.gib, self.entry = gate, g, gib, -1

    def __enter__(self) -> _Reservation:
        self.entry = self.gate._acquire(self.g, self.gib)
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate._release(self.entry)


class SharedMemoryGate:
    """The memory gate of several sweeps on one machine (``--gpu-gate FILE``): the same admission rule as
    `MemoryGate`, over one table of reservations that every sweep naming FILE reads and writes, so the runs of two
    plans sharing a GPU (e.g. a study's main phase and an instruction-tuning plan) keep within one budget per GPU
    instead of each counting only its own. GPUs are named by their physical index, as ``--gpus`` names them.

    The table is JSON in FILE, changed only under an exclusive ``fcntl.flock`` of ``FILE.lock`` and replaced whole
    (``os.replace``), so a reader never sees half of it; an entry whose process is gone is dropped at the next look,
    as in `MemoryGate`. (A file, not a multiprocessing table: separate sweeps share no Python parent. The lock is
    POSIX ``flock``: local file systems; the sweeps of one machine.) Picklable: the pool's spawned workers get it as
    they get a `MemoryGate`."""

    POLL_S = 0.5

    def __init__(self, path: str | Path, budget_gib: float) -> None:
        import fcntl  # noqa: F401  (POSIX only: fails here, where the sweep can say so, not in a worker)

        self.path = Path(path)
        self.budget = float(budget_gib)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def reserve(self, gpu: int, gib: float) -> _Reservation:
        return _Reservation(self, gpu, min(gib, self.budget))

    @contextlib.contextmanager
    def _table(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The table, locked; changes made to it are written back when the block ends without an error."""
        import fcntl

        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    table = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
                except (OSError, ValueError) as err:
                    raise RuntimeError(f"the shared GPU memory gate {str(self.path)!r} cannot be read ({err}): "
                                       "remove it once no sweep uses it") from None
                before = json.dumps(table, sort_keys=True)
                table = {k: e for k, e in table.items() if pid_alive(int(e["pid"]))}
                yield table
                if json.dumps(table, sort_keys=True) != before:
                    tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(table, sort_keys=True), encoding="utf-8")
                    os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _used_in(table: Mapping[str, Mapping[str, Any]], gpu: int) -> float:
        return sum(e["gib"] for e in table.values() if e["state"] == "holding" and e["gpu"] == gpu)

    def _acquire(self, gpu: int, gib: float) -> str:
        entry = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        mine = {"state": "waiting", "gpu": gpu, "gib": gib, "pid": os.getpid(), "since": time.time()}
        with self._table() as table:
            table[entry] = dict(mine)
        try:
            while True:
                with self._table() as table:
                    table.setdefault(entry, dict(mine))  # (the file was removed meanwhile: wait on, as before)
                    waiting = {k: e["since"] for k, e in table.items() if e["state"] == "waiting" and e["gpu"] == gpu}
                    if admissible(gib, self._used_in(table, gpu), self.budget, entry, waiting, time.time()):
                        table[entry]["state"] = "holding"
                        return entry
                time.sleep(self.POLL_S)
        except BaseException:  # interrupted while waiting: leave no entry behind
            self._release(entry)
            raise

    def _release(self, entry: str) -> None:
        with self._table() as table:
            table.pop(entry, None)

    def used(self, gpu: int) -> float:
        with self._table() as table:
            return self._used_in(table, gpu)


def positive_number(value: Any, what: str) -> float:
    """`value` as a float when it is a finite number > 0 (not a bool), else ValueError naming it as `what`: the
    ``--gpu-memory`` budget, the ``--deadline``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


__all__ = ["OVERHEAD_GIB", "PATIENCE_S", "SLACK", "Estimate", "MemoryGate", "SharedMemoryGate", "admissible",
           "estimate", "longest_first", "measured_runs", "members_per_step", "positive_number", "reservation"]
