"""Scheduling a sweep on a shared GPU (`loradrop.app.sweep_schedule`): estimates from finished runs, the admission
rule, the memory gate across real worker processes, the out-of-memory retry, and the CLI's checks."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from loradrop.app import sweep, sweep_run
from loradrop.app.sweep_schedule import (
    OVERHEAD_GIB,
    SLACK,
    MemoryGate,
    SharedMemoryGate,
    admissible,
    estimate,
    longest_first,
    measured_runs,
    members_per_step,
    reservation,
)


def _result(folder: Path, run_id: str, task: str, method: str, peak_mib: float, wall: float, **settings) -> None:
    data = {"schema": "loradrop.sweep.run/1", "run_id": run_id, "method": method, "status": "ok",
            "settings": {"task": task, **settings}, "peak_memory_mib": {"cuda": peak_mib, "rss": 1.0},
            "wall_time_s": wall}
    (folder / f"{run_id}.json").write_text(json.dumps(data), encoding="utf-8")


def test_estimates_come_from_the_finished_runs(tmp_path: Path) -> None:
    _result(tmp_path, "arc__lora__lr-1", "arc", "lora", 8 * 1024, 160.0, no_lora_dropout=True)
    _result(tmp_path, "arc__lora__lr-2", "arc", "lora", 9 * 1024, 140.0, no_lora_dropout=True)
    _result(tmp_path, "arc__ld1__lr-1", "arc", "ld1", 10 * 1024, 200.0, p=0.5, samples=1)
    (tmp_path / "arc__ld4__lr-1.failed.json").write_text(json.dumps({"status": "failed", "method": "ld4"}))
    (tmp_path / "notes.json").write_text("not json")
    measured = measured_runs(tmp_path)
    assert len(measured) == 3 and all(m["members"] == 1 for m in measured)
    # same task and method: the largest peak and the longest wall time of its runs
    got = estimate("arc", "lora", {"no_lora_dropout": True}, measured)
    assert (got.memory_gib, got.seconds, got.source) == (9.0, 160.0, "measured")
    # same task, a method not run yet: the smallest per-member peak of the others, times its members per step
    got = estimate("arc", "ld4", {"p": 0.5, "samples": 4}, measured)
    assert (got.memory_gib, got.seconds, got.source) == (32.0, 200.0, "scaled")
    scaled = got
    assert estimate("arc", "ld4c", {"p": 0.5, "samples": 4, "chunk_size": 2}, measured).memory_gib == 16.0
    # a task not run yet: the other tasks' largest peak per member, times the members (never below an even share)
    got = estimate("boolq", "ld4", {"p": 0.5, "samples": 4}, measured)
    assert (got.memory_gib, got.seconds, got.source) == (40.0, None, "other tasks")
    assert reservation(got, 100.0, 10.0) == pytest.approx((40.0 + OVERHEAD_GIB) * SLACK)
    small = estimate("boolq", "lora", {}, [{**m, "memory_gib": 1.0} for m in measured])
    assert (small.memory_gib, small.source) == (1.0, "other tasks") and reservation(small, 100.0, 12.5) == 12.5
    assert estimate("boolq", "lora", {}, []).source == "unknown"
    # the same method with a samples axis: its measured peak per member, times this run's members
    _result(tmp_path, "arc__sens__lr-1_samples-1", "arc", "sens", 10 * 1024, 200.0, p=0.5, samples=1)
    got = estimate("arc", "sens", {"p": 0.5, "samples": 8}, measured_runs(tmp_path))
    assert (got.memory_gib, got.source) == (80.0, "measured")
    # a resumed run's time (the sum of its attempts) is only an upper bound: a run measured in one go comes first,
    # then the shortest resumed one of the same method, then the task's other methods
    data = json.loads((tmp_path / "arc__sens__lr-1_samples-1.json").read_text())
    data["attempts"], data["wall_time_s"] = [{"seconds": 400.0, "outcome": "killed"}], 900.0
    (tmp_path / "arc__sens__lr-1_samples-1.json").write_text(json.dumps(data))
    data["run_id"], data["wall_time_s"] = "arc__sens__lr-2_samples-1", 700.0
    (tmp_path / "arc__sens__lr-2_samples-1.json").write_text(json.dumps(data))
    got = estimate("arc", "sens", {"p": 0.5, "samples": 1}, measured_runs(tmp_path))
    assert (got.memory_gib, got.seconds, got.source) == (10.0, 700.0, "measured")
    _result(tmp_path, "arc__sens__lr-3_samples-1", "arc", "sens", 10 * 1024, 300.0, p=0.5, samples=1)
    assert estimate("arc", "sens", {"p": 0.5, "samples": 1}, measured_runs(tmp_path)).seconds == 300.0
    assert estimate("arc", "other", {}, measured_runs(tmp_path)).seconds == 300.0  # the task's longest clean run
    # a method measured on other tasks: the task's longest run times the method's median ratio to the longest other
    # method there (MC dropout's sequential test passes)
    _result(tmp_path, "wg__lora__lr-1", "wg", "lora", 2 * 1024, 100.0, no_lora_dropout=True)
    _result(tmp_path, "wg__mc__lr-1", "wg", "mc", 2 * 1024, 150.0, no_lora_dropout=True)
    assert estimate("arc", "mc", {}, measured_runs(tmp_path)).seconds == pytest.approx(300.0 * 1.5)
    assert members_per_step({"p": 0.5, "samples": 4, "no_lora_dropout": True}) == 1
    assert members_per_step({"p": 0.0, "samples": 4}) == 1 and members_per_step({"samples": 3}) == 3

    # a reservation: estimate plus overhead, with slack; an even share when unknown; never over the budget
    assert reservation(scaled, 100.0, 10.0) == pytest.approx((32.0 + OVERHEAD_GIB) * SLACK)
    assert reservation(scaled, 20.0, 10.0) == 20.0
    assert reservation(estimate("boolq", "lora", {}, []), 100.0, 12.5) == 12.5
    # the longest first, unknown ones before them, ties in plan order
    assert longest_first(["a", "b", "c", "d"], {"a": 10.0, "b": None, "c": 30.0, "d": 10.0}) == ["b", "c", "a", "d"]


def test_admission_backfills_but_never_starves() -> None:
    assert admissible(30, used=60, budget=100, me=1, waiting={1: 100.0}, now=101.0)
    assert not admissible(50, used=60, budget=100, me=1, waiting={1: 100.0}, now=101.0)
    assert admissible(500, used=0, budget=100, me=1, waiting={1: 100.0}, now=101.0)  # alone on a free GPU
    # a small run may pass a large one that waits (backfilling) until the large one has waited `patience`
    waiting = {0: 100.0, 1: 150.0}
    assert admissible(10, used=60, budget=100, me=1, waiting=waiting, now=160.0, patience=120.0)
    assert not admissible(10, used=60, budget=100, me=1, waiting=waiting, now=230.0, patience=120.0)
    assert not admissible(50, used=60, budget=100, me=0, waiting=waiting, now=230.0, patience=120.0)
    assert admissible(50, used=40, budget=100, me=0, waiting=waiting, now=230.0, patience=120.0)


def _hold(gate: MemoryGate, slot: int, gib: float, log) -> None:
    with gate.reserve(0, gib):
        log.put(("start", slot, gate.used(0), time.time()))
        time.sleep(1.5)
        log.put(("end", slot, gate.used(0), time.time()))


def _gate(kind: str, context, tmp_path: Path, workers: int) -> MemoryGate | SharedMemoryGate:
    """A pool's own gate, or the file-backed gate that separate sweeps share (each process unpickles its own copy of
    it, as each sweep makes its own: only the file is common)."""
    if kind == "pool":
        return MemoryGate(context, [0], 100.0, workers=workers)
    return SharedMemoryGate(tmp_path / "gate.json", 100.0)


@pytest.mark.parametrize("kind", ["pool", "shared"])
def test_the_gate_keeps_worker_processes_within_the_budget(kind: str, tmp_path: Path) -> None:
    """Four processes ask for 40, 40, 40 and 150 GiB of a 100 GiB budget: at most two 40s run together, and the run
    larger than the budget runs alone."""
    context = multiprocessing.get_context("spawn")
    gate = _gate(kind, context, tmp_path, workers=4)
    log = context.Queue()
    procs = [context.Process(target=_hold, args=(gate, slot, gib, log)) for slot, gib in enumerate((40, 40, 40, 150))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    events = sorted((log.get(timeout=5) for _ in range(8)), key=lambda e: e[3])
    assert all(p.exitcode == 0 for p in procs)
    running, peak = set(), 0.0
    for kind, slot, used, _ in events:
        assert used <= 100.0 + 1e-9
        if kind == "start":
            running.add(slot)
            assert 3 not in running or running == {3}, running  # the oversized run is alone
            peak = max(peak, used)
        else:
            running.discard(slot)
    assert peak == 100.0  # the oversized run took the whole budget
    assert 80.0 in [used for kind, _, used, _ in events if kind == "start"]  # and two of the 40s shared the GPU
    assert gate.used(0) == 0.0


def _hold_forever(gate: MemoryGate, gib: float, log) -> None:
    with gate.reserve(0, gib):
        log.put("holding")
        time.sleep(600)


@pytest.mark.parametrize("kind", ["pool", "shared"])
def test_a_dead_worker_gives_its_memory_back(kind: str, tmp_path: Path) -> None:
    """A worker killed while it holds a reservation (or while it waits) must not wedge the others: its entry is
    dropped at the next look, and a run needing the whole budget gets it."""
    import os
    import signal

    context = multiprocessing.get_context("spawn")
    gate = _gate(kind, context, tmp_path, workers=2)
    log = context.Queue()
    holder = context.Process(target=_hold_forever, args=(gate, 70.0, log))
    holder.start()
    assert log.get(timeout=60) == "holding" and gate.used(0) == 70.0
    waiter = context.Process(target=_hold_forever, args=(gate, 50.0, log))  # does not fit: waits
    waiter.start()
    time.sleep(3)
    assert gate.used(0) == 70.0
    os.kill(waiter.pid, signal.SIGKILL)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(timeout=10)
    waiter.join(timeout=10)
    start = time.time()
    with gate.reserve(0, 100.0):
        assert gate.used(0) == 100.0
    assert time.time() - start < 5 and gate.used(0) == 0.0


def test_sweeps_naming_one_gate_file_share_one_budget_per_gpu(tmp_path: Path) -> None:
    """Two sweeps' gates on one file see each other's reservations (a run of one waits for the other's to end); a
    second GPU has its own budget, and a gate of another file is independent."""
    import threading

    a, b = SharedMemoryGate(tmp_path / "gate.json", 100.0), SharedMemoryGate(tmp_path / "gate.json", 100.0)
    other = SharedMemoryGate(tmp_path / "other.json", 100.0)
    started: list[float] = []

    def run_of_b() -> None:
        with b.reserve(0, 50.0):
            started.append(b.used(0))

    with a.reserve(0, 70.0):
        assert b.used(0) == 70.0 and b.used(1) == 0.0 and other.used(0) == 0.0
        with b.reserve(1, 90.0), other.reserve(0, 90.0):  # neither waits
            assert a.used(1) == 90.0 and other.used(0) == 90.0
        waiter = threading.Thread(target=run_of_b)
        waiter.start()
        time.sleep(1.5)
        assert started == [] and waiter.is_alive()  # 70 + 50 > 100: b's run waits for a's
    waiter.join(timeout=10)
    assert started == [50.0] and a.used(0) == 0.0
    assert json.loads((tmp_path / "gate.json").read_text()) == {}  # nothing left behind


def test_a_sweep_hands_its_shared_gate_to_its_workers_and_gates_a_lone_run(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """With --gpu-gate the pool's workers get the file's gate (not a gate of their own), and a sweep running one
    run in its own process reserves its memory there too: another sweep's runs may share the GPU."""
    from helpers import gate_of_worker
    from loradrop.app.sweep import _statuses

    shared = SharedMemoryGate(tmp_path / "gate.json", 100.0)
    seen = {s["run_id"]: s for s in _statuses(["a", "b"], workers=2, gpu_memory_gib=100.0, target=gate_of_worker,
                                                gate=shared)}
    assert {(s["gate"], s["path"]) for s in seen.values()} == {("SharedMemoryGate", str(shared.path))}
    own = _statuses(["a", "b"], workers=2, gpu_memory_gib=100.0, target=gate_of_worker)
    assert {s["gate"] for s in own} == {"MemoryGate"}

    used: list[float] = []
    monkeypatch.setattr(sweep_run, "run_job", lambda job: used.append(shared.used(3)) or
                        {"run_id": job.run_id, "status": "ok"})
    job = SimpleNamespace(run_id="x", reserve_gib=30.0, finish_by=None, expected_s=None)
    assert [s["status"] for s in _statuses([job], workers=1, gpus=[3], gate=shared)] == ["ok"]
    assert used == [30.0] and shared.used(3) == 0.0  # held on GPU 3 while it ran, given back after


def test_a_run_out_of_gpu_memory_is_tried_again_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from loradrop import ensemble

    gate = MemoryGate(multiprocessing.get_context("spawn"), [0], 80.0, workers=2)
    seen, budgets = [], []

    def fake_execute(job):
        seen.append(gate.used(0))
        budgets.append(ensemble._CUDA_BUDGET)  # the ensembles' automatic chunks keep to the reservation
        if len(seen) == 1:
            return {"run_id": "r", "status": "failed", "error": "OutOfMemoryError: CUDA out of memory. Tried to ..."}
        return {"run_id": "r", "status": "ok"}

    monkeypatch.setattr(sweep_run, "execute", fake_execute)
    monkeypatch.setattr(sweep_run, "_GATE", gate)
    job = sweep_run.RunJob(None, "p", tmp_path, tmp_path, reserve_gib=10.0)  # type: ignore[arg-type]
    assert sweep_run.execute_in_worker(job) == {"run_id": "r", "status": "ok", "retried_alone": True}
    assert seen == [10.0, 80.0] and gate.used(0) == 0.0
    assert budgets == [int((10 - OVERHEAD_GIB) * 2**30), int((80 - OVERHEAD_GIB) * 2**30)]  # the tensors' part
    assert ensemble._CUDA_BUDGET is None
    # other failures are not retried, nor is a run that already had the whole budget
    monkeypatch.setattr(sweep_run, "execute", lambda job: {"run_id": "r", "status": "failed", "error": "ValueError"})
    assert sweep_run.execute_in_worker(job)["status"] == "failed"
    seen.clear()
    monkeypatch.setattr(sweep_run, "execute", fake_execute)
    whole = sweep_run.RunJob(None, "p", tmp_path, tmp_path, reserve_gib=80.0)  # type: ignore[arg-type]
    assert sweep_run.execute_in_worker(whole)["status"] == "failed" and seen == [80.0]


def test_a_run_that_would_end_past_the_deadline_is_not_started(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """`--deadline`: a run whose expected time (less what its earlier attempts did) would take it past the deadline is
    deferred without training; unknown times and no deadline never defer."""
    from loradrop.app.sweep_run import PlannedRun, RunJob, expected_left, run_job, too_late

    monkeypatch.setattr(sweep_run, "execute", lambda job: {"run_id": job.run_id, "status": "ok"})
    now = time.time()
    run = PlannedRun("r", "lora", {}, {"task": "rte"})
    job = RunJob(run, "p", tmp_path / "res", tmp_path / "work", expected_s=100.0, finish_by=now + 50)
    assert too_late(job, now) and run_job(job) == {"run_id": "r", "status": "deferred", "expected_s": 100.0}
    assert not too_late(RunJob(run, "p", tmp_path, tmp_path, expected_s=100.0, finish_by=now + 200), now)
    assert too_late(RunJob(run, "p", tmp_path, tmp_path, expected_s=100.0, finish_by=now + 105), now)  # 10% margin
    assert not too_late(RunJob(run, "p", tmp_path, tmp_path, expected_s=None, finish_by=now + 1), now)
    assert run_job(RunJob(run, "p", tmp_path, tmp_path, expected_s=100.0)) == {"run_id": "r", "status": "ok"}
    # a run that will continue its checkpoint expects its estimate less its earlier attempts' time, but at least a
    # quarter of it; one that starts over (here: no checkpoint) expects all of it
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "r.attempts.json").write_text(json.dumps({"settings": {"task": "rte"}, "attempts": [
        {"seconds": 60.0, "outcome": "interrupted"}]}))
    assert expected_left(job) == 100.0 and too_late(job, now)
    monkeypatch.setattr(sweep_run, "_resumable", lambda job, settings, stored: None)
    assert expected_left(job) == 40.0 and not too_late(job, now)
    (tmp_path / "work" / "r.attempts.json").write_text(json.dumps({"settings": {"task": "rte"}, "attempts": [
        {"seconds": 95.0, "outcome": "interrupted"}]}))
    assert expected_left(job) == 25.0
    # behind a memory gate, a job that is too late already is deferred without waiting for memory
    gate = MemoryGate(multiprocessing.get_context("spawn"), [0], 10.0, workers=2)
    monkeypatch.setattr(sweep_run, "_GATE", gate)
    late = RunJob(run, "p", tmp_path / "res", tmp_path / "nowork", reserve_gib=5.0, expected_s=100.0,
                  finish_by=time.time() + 50)
    with gate.reserve(0, 10.0):  # the GPU is full: a job that waited would block here
        assert sweep_run.execute_in_worker(late)["status"] == "deferred"


def test_earlier_runs_laplace_fits_go_first_and_late_runs_are_deferred(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """With `laplace`, a finished LoRA run whose fit was cut off (its result there, no Laplace result, its run folder
    kept) is fitted before anything trains, and its folder then goes; with a deadline shorter than the runs measured
    so far, the pending runs are deferred, not started."""
    from loradrop.app.runfolder import ADAPTER_DIR
    from loradrop.app.sweep import SweepPlan, pending, run_sweep

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("name: x\nbase: {task: rte, model: minilm}\ngrid: {seed: [0, 1, 2]}\n"
                         "methods: {lora: {no_lora_dropout: true}}\n", encoding="utf-8")
    plan = SweepPlan.load(plan_file)
    results, work = tmp_path / "res", tmp_path / "work"
    results.mkdir()
    done = plan.runs()[0]
    (results / f"{done.run_id}.json").write_text(json.dumps({
        "schema": "loradrop.sweep.run/1", "run_id": done.run_id, "method": "lora", "axes": done.axes,
        "settings": done.settings, "status": "ok", "wall_time_s": 1000.0, "metrics": {}}), encoding="utf-8")
    (work / done.run_id / ADAPTER_DIR).mkdir(parents=True)
    (work / done.run_id / ADAPTER_DIR / "adapter_config.json").write_text("{}", encoding="utf-8")
    other = plan.runs()[1]  # a second kept run, whose fit fails: it keeps its folder and is not counted as done
    (results / f"{other.run_id}.json").write_text(json.dumps({
        "schema": "loradrop.sweep.run/1", "run_id": other.run_id, "method": "lora", "axes": other.axes,
        "settings": other.settings, "status": "ok", "wall_time_s": 1000.0, "metrics": {}}), encoding="utf-8")
    (work / other.run_id / ADAPTER_DIR).mkdir(parents=True)
    (work / other.run_id / ADAPTER_DIR / "adapter_config.json").write_text("{}", encoding="utf-8")
    # a Laplace fit measured at 500 s: a LoRA run's job (training, then its fit) expects 1000 + 500 s
    (results / "laplace__seed-9.json").write_text(json.dumps({
        "schema": "loradrop.sweep.run/1", "run_id": "laplace__seed-9", "method": "laplace", "status": "ok",
        "settings": {"task": "rte"}, "wall_time_s": 500.0}), encoding="utf-8")
    order = []

    def fit(job, results, work, *, prior, overrides):
        order.append(("fit", job.run_id, job.run_folder.is_dir()))
        return {"run_id": job.run_id, "status": "ok" if job.run_id.endswith("0") else "failed", "error": "boom"}

    monkeypatch.setattr(sweep_run, "score_one", fit)
    monkeypatch.setattr(sweep_run, "execute", lambda job: order.append(("train", job.run_id)) or
                        {"run_id": job.run_id, "status": "ok"})
    summary = run_sweep(plan, results, work_dir=work, laplace="auto", deadline_s=1200.0, progress=False)
    assert order == [("fit", "laplace__seed-0", True), ("fit", "laplace__seed-1", True)]
    assert not (work / done.run_id).exists() and (work / other.run_id).exists()  # a failed fit keeps its folder
    assert summary["laplace_ok"] == 1 and summary["ok"] == 0 and summary["failed"] == []
    assert summary["laplace_failed"] == [{"run_id": other.run_id, "error": "boom"}]
    assert summary["deferred"] == ["lora__seed-2"]  # 1.1 x (1000 + 500) s expected, 1200 s left
    assert len(pending(plan, results)[0]) == 1
    order.clear()
    summary = run_sweep(plan, results, work_dir=work, laplace="auto", deadline_s=5000.0, progress=False)
    assert order == [("fit", "laplace__seed-1", True), ("train", "lora__seed-2")] and summary["ok"] == 1


def test_an_unmeasured_laplace_fit_counts_as_long_as_its_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no Laplace fit measured yet, a LoRA run's job under `laplace` expects its training time twice (the fit
    after it as long as the run): a deadline between the two defers it; without `laplace` it starts."""
    from loradrop.app.sweep import SweepPlan, run_sweep

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("name: x\nbase: {task: rte, model: minilm}\ngrid: {seed: [0, 1]}\n"
                         "methods: {lora: {no_lora_dropout: true}}\n", encoding="utf-8")
    plan = SweepPlan.load(plan_file)
    results = tmp_path / "res"
    results.mkdir()
    done = plan.runs()[0]
    (results / f"{done.run_id}.json").write_text(json.dumps({
        "schema": "loradrop.sweep.run/1", "run_id": done.run_id, "method": "lora", "axes": done.axes,
        "settings": done.settings, "status": "ok", "wall_time_s": 1000.0, "metrics": {}}), encoding="utf-8")
    trained = []
    monkeypatch.setattr(sweep_run, "execute", lambda job: trained.append(job.run_id) or
                        {"run_id": job.run_id, "status": "ok"})
    monkeypatch.setattr(sweep, "plan_laplace", lambda *a, **k: SimpleNamespace(todo=[]))  # no earlier fits
    summary = run_sweep(plan, results, work_dir=tmp_path / "work", laplace="auto", deadline_s=2000.0,
                        progress=False)
    assert summary["deferred"] == ["lora__seed-1"] and trained == []  # 1.1 x (1000 + 1000) s > 2000 s
    summary = run_sweep(plan, results, work_dir=tmp_path / "work", deadline_s=2000.0, progress=False)
    assert summary["deferred"] == [] and trained == ["lora__seed-1"]  # 1.1 x 1000 s


def test_a_job_whose_worker_dies_fails_and_the_others_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process killed outright (SIGKILL) loses its job: the sweep reports that job failed and the pool's
    replacement worker runs the rest, instead of waiting for ever on a result that never comes (Pool.imap did)."""
    import signal

    from helpers import die_or_echo
    from loradrop.app.sweep import _statuses

    monkeypatch.setattr(sweep_run, "DEATH_GRACE_S", 0.5)

    def hung(*_):
        raise TimeoutError("the sweep waited for a job whose worker had died")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(240)
    try:
        statuses = {s["run_id"]: s for s in _statuses(["a", "die", "b", "c"], workers=2, target=die_or_echo)}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert statuses["die"]["status"] == "failed" and "worker process" in statuses["die"]["error"]
    assert all(statuses[k] == {"run_id": k, "status": "ok"} for k in "abc")


@pytest.mark.parametrize("args, fragment", [(["--deadline", "0"], "--deadline: must be a number > 0"),
                                            (["--gpu-memory", "0"], "--gpu-memory: must be a number > 0"),
                                            (["--gpu-memory", "nan"], "--gpu-memory: must be a number > 0"),
                                            (["--checkpoint-steps", "0"], "--checkpoint-steps: must be an integer"),
                                            (["--gpu-gate", "g.json"], "--gpu-gate shares a memory budget"),
                                            (["--gpu-memory", "10", "--gpu-gate", "/nonexistent/g.json"],
                                             "--gpu-gate '/nonexistent/g.json': its folder does not exist")])
def test_bad_schedule_options_get_one_line(tmp_path: Path, capsys, args: list[str], fragment: str) -> None:
    from loradrop.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text("name: x\nbase: {task: rte}\nmethods: {lora: {no_lora_dropout: true}}\n", encoding="utf-8")
    try:  # argparse's checks exit, the sweep's return
        code = main(["sweep", str(plan), "--results", str(tmp_path / "results"), *args])
    except SystemExit as info:
        code = info.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err.strip().splitlines()[-1], err  # one line says what is wrong
    assert not list(tmp_path.glob("results/*"))  # nothing ran


def test_the_laplace_pass_after_a_sweep_holds_the_shared_budget(tmp_path: Path) -> None:
    """The fits that `loradrop sweep --laplace` retries in its own process after the pool (often after running out of
    memory in a worker) reserve the whole shared budget, so another sweep's runs wait instead of joining them."""
    from argparse import Namespace

    from loradrop.cli import _whole_shared_gate

    gate = SharedMemoryGate(tmp_path / "gate.json", 80.0)
    with _whole_shared_gate(Namespace(gpu_gate=str(gate.path), gpu_memory=80.0, gpus=[2])):
        assert gate.used(2) == 80.0 and gate.used(0) == 0.0
    assert gate.used(2) == 0.0
    with _whole_shared_gate(Namespace(gpu_gate=None, gpu_memory=80.0, gpus=None)):  # no shared gate: nothing held
        assert gate.used(0) == 0.0
