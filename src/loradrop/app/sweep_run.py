"""One run of a sweep, as a worker process trains it: `execute` trains a `PlannedRun` through `train_run.train` and
writes its result JSON (or ``<id>.failed.json``).

Beyond a plain training run it

- **continues an interrupted run**: with ``checkpoint_steps`` every run saves a checkpoint that often, and a run whose
  folder holds a checkpoint from an earlier, interrupted attempt (a sweep stopped by Ctrl-C or a time limit, the
  folders kept on the machine) resumes from it instead of starting over (``--resume``; a checkpoint of other
  settings than the run's now, every setting compared, or a damaged one is set aside and the run starts fresh,
  saying so on stderr). Each attempt's wall time and the run's settings are kept in
  ``<work dir>/<run id>.attempts.json``; a resumed run's ``wall_time_s`` is the sum over its attempts and
  ``attempts`` lists the earlier ones, so its cost is visible as such (a run trained anew after failed attempts
  lists them as ``discarded_attempts``, outside its time);
- **fits Laplace-LoRA right after a plain-LoRA run** (``laplace``): the run folder is still there, so the Laplace
  result (`laplace_sweep.score_one`) needs no ``--keep-runs`` and no second pass (a failed fit keeps the folder, for
  the pass after the sweep or the next one);
- **waits for GPU memory** (`sweep_schedule.MemoryGate`, ``--gpu-memory``; shared with other sweeps on the machine
  through `sweep_schedule.SharedMemoryGate`, ``--gpu-gate``) before it starts, and a run that still runs out of GPU
  memory is tried once more with the GPU to itself;
- **starts only if it can end in time** (``--deadline``): a run (or fit) whose expected time, from the finished runs
  of the results folder, would take it past the sweep's deadline is left pending (status ``deferred``), so the end of
  a GPU lease is not spent on runs it would cut off. A resumed run expects its time less what its earlier attempts
  did.

A `FitJob` is a Laplace fit whose plain-LoRA run finished earlier (its fit was cut off or failed) and whose run
folder is still in the work dir: the sweep puts these first, as they need that folder, which lives only as long as
the machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .laplace_sweep import SOURCE_METHOD as LAPLACE_SOURCE_METHOD
from .laplace_sweep import LaplaceJob, score_one, source_job
from .provenance import hardware, versions
from .results import SCHEMA
from .runfolder import checkpoints, read_json, staging_path, write_json
from .settings import TrainSettings
from .sweep_files import PREDICTION_FILES, compact_predictions, read_rows, result_path


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its id, method, the axes that vary, and its settings (output set by the engine)."""

    run_id: str
    method: str
    axes: dict[str, Any]
    settings: dict[str, Any]

    def train_settings(self, work_dir: Path, checkpoint_steps: int | None = None) -> TrainSettings:
        """The run's `TrainSettings` in `work_dir`; `checkpoint_steps` sets ``save_steps`` where the plan does not."""
        extra = {"save_steps": checkpoint_steps} if checkpoint_steps and not self.settings.get("save_steps") else {}
        return TrainSettings.from_dict({**self.settings, **extra, "output": str(work_dir / self.run_id),
                                        "overwrite": True})


@dataclass(frozen=True)
class RunJob:
    """What a worker needs to train one run: the run, where its result and folder go, and the sweep's options."""

    run: PlannedRun
    plan_name: str
    results: Path
    work_dir: Path
    keep_runs: bool = False
    checkpoint_steps: int | None = None
    laplace: str | None = None  # the Laplace prior ("auto", ...) to fit after a plain-LoRA run; None: no Laplace
    overrides: dict[str, Any] = field(default_factory=dict)  # the sweep's --set values (model folder, data root)
    reserve_gib: float | None = None  # GPU memory to reserve before starting (with a MemoryGate)
    expected_s: float | None = None  # expected wall time (`sweep_schedule.estimate`), None when unknown
    finish_by: float | None = None  # time.time() by which the run should end (``--deadline``); None: no deadline

    @property
    def run_id(self) -> str:
        return self.run.run_id


@dataclass(frozen=True)
class FitJob:
    """A pending Laplace fit of a plain-LoRA run that finished earlier, from its kept run folder."""

    fit: LaplaceJob
    results: Path
    work_dir: Path
    prior: str = "auto"
    keep_runs: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    reserve_gib: float | None = None
    expected_s: float | None = None
    finish_by: float | None = None

    @property
    def run_id(self) -> str:
        return self.fit.run_id


TIME_SLACK = 1.1  # expected times come from runs that shared the GPU differently: a little margin


def _attempts_file(job: RunJob) -> Path:
    return job.work_dir / f"{job.run.run_id}.attempts.json"


def _last_write(job: RunJob) -> float | None:
    """When the run's folders (the interrupted attempt's checkpoints and log) were last written to."""
    output = job.work_dir / job.run.run_id
    times = [p.stat().st_mtime for folder in (output, staging_path(output)) if folder.is_dir()
             for p in folder.rglob("*")]
    return max(times) if times else None


def _earlier_attempts(job: RunJob) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The run's earlier attempts and the settings they ran with (None when unknown). An attempt recorded as started
    and never finished was killed (SIGKILL, or the pool terminated before it could say): its time is counted up to
    the last write to its run folder."""
    path = _attempts_file(job)
    try:
        data = read_json(path) if path.is_file() else {}
    except UsageError:
        return [], None
    if not isinstance(data, dict):
        return [], None
    out = []
    for attempt in data.get("attempts") or []:
        if isinstance(attempt, dict) and attempt.get("outcome") == "started":
            last = _last_write(job)
            attempt = {"seconds": round(max(0.0, (last or attempt["started"]) - attempt["started"]), 1),
                       "outcome": "killed"}
        out.append(attempt)
    settings = data.get("settings")
    return out, settings if isinstance(settings, dict) else None


def _resumable(job: RunJob, settings: TrainSettings, stored: dict[str, Any] | None) -> str | None:
    """Why the interrupted attempt's checkpoint cannot be continued (None: it can): there is none, it ran with other
    settings than the run has now (every setting compared, not only those `--resume` checks), or it is damaged."""
    from .integrity import verify_manifest
    from .runfolder import plan_run

    output = Path(settings.output)
    if not (checkpoints(output) or checkpoints(staging_path(output))):
        return "no checkpoint"
    if stored is None or json.dumps(stored, sort_keys=True, default=str) != json.dumps(
            job.run.settings, sort_keys=True, default=str):
        return "its checkpoint was trained with other settings"
    try:
        plan = plan_run(output, resume=True, overwrite=False)
        if plan.resume_from is not None:
            verify_manifest(plan.resume_from)
    except UsageError as err:
        return str(err)
    return None


def _train(job: RunJob, stored: dict[str, Any] | None) -> tuple[Any, bool]:
    """Train the run, continuing an interrupted attempt's last checkpoint when it can; (result, whether resumed)."""
    from .train_run import train

    settings = job.run.train_settings(job.work_dir, job.checkpoint_steps)
    why = _resumable(job, settings, stored)
    if why is None:
        return train(settings.replace(overwrite=False, resume=True)), True
    if why != "no checkpoint":
        print(f"loradrop sweep: {job.run.run_id}: not resumed ({why}); training from the start", file=sys.stderr)
    return train(settings), False


def execute(job: RunJob) -> dict:
    """Train one planned run and write its result JSON (or ``<id>.failed.json``); returns a short status."""
    from .provenance import peak_memory, release_memory, reset_peak_memory

    run, results = job.run, job.results
    failed = results / f"{run.run_id}.failed.json"
    earlier, stored = _earlier_attempts(job)
    start = time.perf_counter()
    outcome = "interrupted"

    def record(attempt: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            job.work_dir.mkdir(parents=True, exist_ok=True)
            write_json(_attempts_file(job), {"settings": run.settings, "attempts": [*earlier, attempt]})

    record({"started": time.time(), "outcome": "started"})  # on record first, in case this attempt is killed outright
    try:
        reset_peak_memory()
        run_result, resumed = _train(job, stored)
        wall = time.perf_counter() - start
        metrics = run_result.metrics
        folder = run_result.output
        result = {
            "schema": SCHEMA, "plan": job.plan_name, "run_id": run.run_id, "method": run.method, "axes": run.axes,
            "settings": run.settings, "status": "ok", "versions": versions(), "hardware": hardware(),
            "wall_time_s": wall + (sum(a.get("seconds", 0.0) for a in earlier) if resumed else 0.0),
            "peak_memory_mib": peak_memory(), "metrics": metrics,
            "loss_history": read_json(folder / "loss_history.json"),
            "predictions": {k: compact_predictions(read_rows(folder / name)) for k, name in PREDICTION_FILES.items()},
        }
        if earlier:  # continued from them (their time is in wall_time_s), or trained anew after them (it is not)
            result["attempts" if resumed else "discarded_attempts"] = earlier
        ood_sets = ((metrics or {}).get("uncertainty") or {}).get("ood_sets") or []
        if ood_sets:  # every OOD set's rows, by task (the first is also `ood`)
            result["predictions"]["ood_sets"] = {
                part["task"]: compact_predictions(read_rows(folder / part["predictions"])) for part in ood_sets}
        write_json(result_path(results, run.run_id), result, compact=True)
        failed.unlink(missing_ok=True)
        outcome = "ok"
        _attempts_file(job).unlink(missing_ok=True)
        status: dict[str, Any] = {"run_id": run.run_id, "status": "ok", "seconds": wall}
        if job.laplace is not None and run.method == LAPLACE_SOURCE_METHOD:  # the LoRA result stands either way
            status["laplace"] = fit_laplace(source_job(result_path(results, run.run_id), result, folder), results,
                                            job.work_dir, job.laplace, job.overrides, job.keep_runs)
        elif not job.keep_runs:
            shutil.rmtree(folder, ignore_errors=True)
        return status
    except Exception as err:  # one failed run must not stop the sweep; the error is kept with its traceback
        outcome = "failed"
        peak = None
        with contextlib.suppress(Exception):  # (after a sticky CUDA error even this may raise: keep the record)
            peak = peak_memory()
        write_json(failed, {"schema": SCHEMA, "run_id": run.run_id, "method": run.method, "axes": run.axes,
                            "settings": run.settings, "status": "failed", "error": f"{type(err).__name__}: {err}",
                            "peak_memory_mib": peak,  # e.g. how far a run out of memory got
                            "traceback": traceback.format_exc()})
        return {"run_id": run.run_id, "status": "failed", "error": f"{type(err).__name__}: {err}",
                "seconds": time.perf_counter() - start}
    finally:
        if outcome != "ok":  # the time an interrupted or failed attempt spent counts when the run is resumed
            record({"seconds": round(time.perf_counter() - start, 1), "outcome": outcome})
        release_memory()  # the next run of this worker (or of another worker on the GPU) gets the memory back


def fit_laplace(fit: LaplaceJob, results: Path, work_dir: Path, prior: str, overrides: dict[str, Any],
                keep_runs: bool) -> str:
    """Fit and score one Laplace job (`laplace_sweep.score_one`, which never raises for a failed fit), with the GPU
    memory of what ran before it freed; its run folder goes once the fit is done (kept when it fails, to be tried
    again, or with `keep_runs`). Returns ``"ok"`` or the error."""
    from .provenance import release_memory

    release_memory()
    start = time.perf_counter()
    # a line each at the start and the end (the sweep's log): a fit runs inside its run's job, unseen by the bar
    print(f"loradrop sweep: {fit.run_id}: Laplace fit started", file=sys.stderr, flush=True)
    try:
        out = score_one(fit, results, work_dir, prior=prior, overrides=overrides)
    finally:
        release_memory()
    print(f"loradrop sweep: {fit.run_id}: Laplace fit {'done' if out['status'] == 'ok' else 'failed'} after "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if out["status"] != "ok":
        return str(out.get("error", "failed"))
    if not keep_runs:
        shutil.rmtree(fit.run_folder, ignore_errors=True)
    return "ok"


def execute_fit(job: FitJob) -> dict:
    """A pending Laplace fit of an earlier run, as a pool job (`fit_laplace`); the source run itself is fine."""
    return {"run_id": job.fit.source.get("run_id", job.run_id), "status": "ok", "fit_only": True,
            "laplace": fit_laplace(job.fit, job.results, job.work_dir, job.prior, job.overrides, job.keep_runs)}


def expected_left(job: RunJob | FitJob) -> float | None:
    """Seconds the job is expected to take from now: its estimate, less the time of the earlier attempts when it will
    continue their checkpoint (at least a quarter of the estimate: a resumed run reloads its model and evaluates in
    full); a run that will start over (no checkpoint, other settings, a damaged one) expects all of it."""
    if job.expected_s is None:
        return None
    done = 0.0
    if isinstance(job, RunJob):
        earlier, stored = _earlier_attempts(job)
        try:
            resumes = bool(earlier) and _resumable(
                job, job.run.train_settings(job.work_dir, job.checkpoint_steps), stored) is None
        except Exception:  # bad settings: the run will fail and say so in its failed.json; no deferral on that
            resumes = False
        if resumes:
            done = sum(float(a.get("seconds") or 0.0) for a in earlier)
    return max(job.expected_s - done, 0.25 * job.expected_s)


def too_late(job: RunJob | FitJob, now: float | None = None) -> bool:
    """Whether the job, started now, is expected to end after its deadline (never when either is unknown)."""
    left = expected_left(job)
    if job.finish_by is None or left is None:
        return False
    return (time.time() if now is None else now) + TIME_SLACK * left > job.finish_by


def run_job(job: RunJob | FitJob) -> dict:
    """Train the run (or fit the Laplace job), or defer it when it would end past its deadline."""
    if too_late(job):  # checked when the job would start: after any wait for memory
        return {"run_id": job.run_id, "status": "deferred", "expected_s": expected_left(job)}
    return execute_fit(job) if isinstance(job, FitJob) else execute(job)


def is_out_of_memory(status: dict[str, Any]) -> bool:
    error = str(status.get("error") or "")
    return status.get("status") != "ok" and ("OutOfMemoryError" in error or "CUDA out of memory" in error)


# ------------------------------------------------------------------------------------------------ the pool's workers
_GATE: Any = None  # the pool's MemoryGate (sweep_schedule), set by `worker_init`
_STARTED: Any = None  # the pool's table: job index -> pid of the worker that took it (`execute_tracked`)
_GPU = 0


def worker_gpu(gpus: list[int], worker: int) -> int:
    """The GPU of worker number `worker` (1-based, as multiprocessing numbers pool workers): round robin."""
    return gpus[(worker - 1) % len(gpus)]


def worker_init(gpus: list[int] | None = None, gate: Any = None, started: Any = None) -> None:
    """A worker process: quiet, one compute thread each (many runs share the machine), and with `gpus` its own
    GPU (set before torch is imported, so every run of this worker sees that one card as cuda:0); with `gate`, its
    runs reserve GPU memory before they start; `started`: the table `execute_tracked` writes."""
    import multiprocessing

    global _GATE, _GPU, _STARTED
    _STARTED = started
    # (k,): from the parent's process counter, consecutive for a pool's workers, so round robin over them;
    # a worker that replaces a crashed one takes the next number (the load may then be uneven)
    identity = multiprocessing.current_process()._identity
    number = identity[0] if identity else 1
    if gpus:
        _GPU = worker_gpu(gpus, number)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(_GPU)
    _GATE = gate
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(max(1, int(os.environ.get("LORADROP_WORKER_THREADS", "1"))))
    transformers.logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def _tensor_bytes(reserve_gib: float) -> int:
    """Bytes of a reservation that tensors may use: less the CUDA context's share (`OVERHEAD_GIB`), which
    ``torch.cuda.memory_allocated`` does not count."""
    from .sweep_schedule import OVERHEAD_GIB

    return int(max(reserve_gib - OVERHEAD_GIB, 0.0) * 2**30)


def execute_in_worker(job: RunJob | FitJob) -> dict:
    """A pool worker's run (or Laplace fit): its output kept out of the sweep's progress bar, with a memory gate
    started once its memory is reserved, and not started at all when it would end past its deadline; a run that runs
    out of GPU memory anyway is tried once more with the whole budget. The ensembles' automatic chunks keep to the
    reservation (`ensemble.cuda_memory_budget`)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return run_gated(job, _GATE, _GPU)


def run_gated(job: RunJob | FitJob, gate: Any, gpu: int) -> dict:
    """`job` once `gate` (a `MemoryGate` or `SharedMemoryGate`, or None: no gate) has its memory reserved on `gpu`,
    and not at all when it would end past its deadline; tried once more with the whole budget if it runs out of GPU
    memory anyway."""
    from ..ensemble import cuda_memory_budget

    if gate is None or job.reserve_gib is None or too_late(job):  # (too late already: no wait for memory)
        return run_job(job)
    # the ensembles' automatic chunks keep to the reservation: sized from the card's free memory, one run's
    # ensemble pass would take the room that the runs beside it grow into
    with gate.reserve(gpu, job.reserve_gib), cuda_memory_budget(_tensor_bytes(job.reserve_gib)):
        status = run_job(job)
    if is_out_of_memory(status) and job.reserve_gib < gate.budget:
        with gate.reserve(gpu, gate.budget), cuda_memory_budget(_tensor_bytes(gate.budget)):
            status = {**run_job(job), "retried_alone": True}
    return status


def execute_tracked(item: tuple[int, Callable[[Any], dict], Any]) -> dict:
    """Pool job `index`: the worker notes that it took it (its pid in the table), then runs ``target(job)``."""
    index, target, job = item
    if _STARTED is not None:
        _STARTED[index] = os.getpid()
    return target(job)


DEATH_GRACE_S = 5.0  # a dead worker's job is failed only if its result has not come in by then (it may be in transit)


def tracked_results(pool: Any, jobs: list[Any], started: Any, target: Callable[[Any], dict],
                    poll_s: float = 0.2) -> Generator[dict, None, bool]:
    """Each job's status as it ends, through `pool` (whose workers `worker_init` gave the `started` table). A job
    whose worker process died (SIGKILL, the host's OOM killer, a crash in CUDA or the MPS server) is reported as
    failed, and the others go on: with ``Pool.imap`` its result would never come, and the sweep would wait for it
    for ever (a new worker replaces the dead one, the job itself is lost). Its run has no result, so it stays
    pending and a later sweep trains it again (from its last checkpoint). Returns whether a worker died: the pool
    then still counts the lost job as outstanding, so it must be terminated, not closed and joined (which would wait
    for that job for ever)."""
    from .runfolder import pid_alive

    waiting = {i: pool.apply_async(execute_tracked, ((i, target, job),)) for i, job in enumerate(jobs)}
    dead_since: dict[int, float] = {}
    while waiting:
        for i, result in list(waiting.items()):
            if result.ready():
                del waiting[i]
                yield result.get()
            elif started[i] and not pid_alive(started[i]):
                first = dead_since.setdefault(i, time.monotonic())
                if time.monotonic() - first >= DEATH_GRACE_S:
                    del waiting[i]
                    yield {"run_id": getattr(jobs[i], "run_id", str(jobs[i])), "status": "failed",
                           "error": f"its worker process (pid {started[i]}) died while running it"}
        if waiting:
            time.sleep(poll_s)
    return bool(dead_since)


__all__ = ["FitJob", "PlannedRun", "RunJob", "execute", "execute_fit", "execute_in_worker", "execute_tracked",
           "expected_left", "fit_laplace", "is_out_of_memory", "run_job", "too_late", "tracked_results", "worker_gpu",
           "worker_init"]
