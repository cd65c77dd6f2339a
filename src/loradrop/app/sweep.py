"""``loradrop sweep PLAN.yaml``: a grid of training runs (task x method x hyper-parameters x seed) through the Python
entry point `loradrop.app.train`, one JSON result per run.

A plan::

    name: glue-main
    results: results/glue-main          # relative to the plan file (or --results)
    base: {model: minilm, epochs: 10, batch_size: 32, holdout_fraction: 0.1, epoch_eval: true}
    grid: {task: [rte, mrpc], lr: [5.0e-4, 2.0e-3], seed: [0, 1, 2]}
    methods:                            # name -> settings; a list value is one more axis of that method only
      lora: {no_lora_dropout: true}
      lora_dropout: {p: 0.5, samples: 4}
      p_sweep: {p: [0.1, 0.3, 0.5], samples: [1, 4]}
    task_settings:                      # per task, or per task and method ("task/method"), before the method's;
                                        # a list for a grid axis is that task's own values (e.g. lr: [...])
      sst2: {max_train_samples: 10000}
      mrpc/lora_dropout: {lr: 2.0e-3}
    select_from: tune.yaml              # optional: each task/method's lr from a tuning sweep (plan or results)

``select_from`` makes a two-phase study one command per phase: every run takes the learning rate (and, for the
methods whose local axes the report selects, those axes) that `loradrop report` chooses for its task and method in
that folder, by validation over the seeds common to all candidates (`report_tables.select`); explicit settings
(``task/method`` and the method's own) still win. ``select_from`` may name phase 1's plan file instead of its results
folder: then a task/method whose phase-1 runs are not all finished is refused (an unfinished phase 1 would otherwise
be chosen from in silence). A failed phase-1 run, a task/method without results, and a finished phase-2 run trained at
another setting than the one chosen now are refused too, one line each.

expands to one `TrainSettings` per combination, every one validated before the first run starts. A run whose
result exists is skipped, so a killed sweep continues where it stopped when started again; a run that fails
writes ``<run>.failed.json`` (with the traceback) and is tried again on the next start. ``--workers K`` trains K
runs at once in separate processes (on one GPU: several small runs share the card; on a CPU: 1).

Each result, ``<results>/<run id>.json``, holds the plan and run id, the method and its axes, the settings, versions
and hardware, wall time and peak memory, the run's ``metrics.json`` (per-epoch validation / test metrics with
``epoch_eval``, final single-pass and ensemble metrics with ECE/NLL/Brier), the loss history, and the per-example
predictions on the test and validation splits (final and best epoch) for post-hoc analysis: deep ensembles
across seeds, temperature scaling fitted on validation, reliability diagrams. A plan that sets ``ood_task`` and / or
``conformal_alpha`` gets the ``uncertainty`` section of ``metrics.json`` (selective prediction, OOD detection,
conformal sets; `loradrop.app.acting`) and the OOD tasks' predictions (``ood``: the first; ``ood_sets``: each by
task name; ``ood_task`` may list several, e.g. OpenBookQA scored on ARC-C, ARC-E and two MMLU subjects in one run),
which ``loradrop report`` averages over seeds.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import LoradropError, SettingsError, UsageError
from .laplace_sweep import METHOD as LAPLACE_METHOD
from .laplace_sweep import SOURCE_METHOD as LAPLACE_SOURCE_METHOD
from .laplace_sweep import plan_laplace
from .runfolder import read_json
from .settings import TrainSettings
from .sweep_files import result_path
from .sweep_files import run_id as _run_id
from .sweep_run import (
    FitJob,
    PlannedRun,
    RunJob,
    execute,
    execute_in_worker,
    run_gated,
    run_job,
    tracked_results,
    worker_gpu,
    worker_init,
)

PLAN_KEYS = {"name", "description", "results", "base", "grid", "methods", "task_settings", "select_from"}
ENGINE_OWNED = {"output", "resume", "overwrite"}



@dataclass
class SweepPlan:
    """A parsed, validated plan (see the module docstring)."""

    name: str
    methods: dict[str, dict[str, Any]]
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    task_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: Path | None = None
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)  # applied last, e.g. a local model path on a machine
    only: list[str] = field(default_factory=list)  # glob patterns of run ids to keep (all when empty)
    select_from: Path | None = None  # a tuning sweep's results: lr per task/method chosen there by validation
    settled_only: bool = False  # leave out (list in `waiting`) the task/methods whose phase 1 is unfinished
    waiting: dict[tuple[str, str], str] = field(default_factory=dict, init=False)  # (task, method) -> why it waits
    _selected: dict[tuple[str, str], dict[str, Any]] | None = field(default=None, init=False, repr=False)
    _unfinished: dict[tuple[str, str], str] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def load(cls, path: str | Path, *, only: list[str] | None = None, settled_only: bool = False) -> SweepPlan:
        """Read a YAML (or JSON) plan; every problem of the runs kept by `only` (glob patterns of run ids; all runs
        when empty) is reported in one `SettingsError`. `settled_only`: a phase 2 (``select_from``) leaves out the
        task/methods whose phase-1 runs are not all done (`waiting` names them) instead of refusing the plan, so it
        can run beside the end of its phase 1."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise UsageError(f"sweep plan {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe_load: a plan never executes anything
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UsageError(f"sweep plan {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(raw, dict):
            raise UsageError(f"sweep plan {str(path)!r} must be a mapping with keys {sorted(PLAN_KEYS)}")
        unknown = sorted(set(raw) - PLAN_KEYS)
        if unknown:
            raise UsageError(f"sweep plan {str(path)!r}: unknown key(s) {unknown}; allowed: {sorted(PLAN_KEYS)}")
        results, select_from = raw.get("results"), raw.get("select_from")
        plan = cls(name=str(raw.get("name") or path.stem), methods=raw.get("methods") or {},
                   base=raw.get("base") or {}, grid=raw.get("grid") or {}, task_settings=raw.get("task_settings") or {},
                   results=(path.parent / results) if results else None, description=str(raw.get("description", "")),
                   select_from=(path.parent / str(select_from)) if select_from else None, only=list(only or []),
                   settled_only=settled_only)
        plan.runs()  # validate every run now
        return plan

    def runs(self) -> list[PlannedRun]:
        """Every run of the plan, in a stable order, each with validated settings."""
        problems: list[str] = []
        for what, value in (("base", self.base), ("grid", self.grid), ("methods", self.methods),
                            ("task_settings", self.task_settings)):
            if not isinstance(value, dict):
                problems.append(f"{what} must be a mapping, got {type(value).__name__}")
        if not problems and not self.methods:
            problems.append("methods must name at least one method")
        if problems:
            raise SettingsError(problems)
        owned = sorted(ENGINE_OWNED & (set(self.base) | set(self.grid) | set(self.overrides)
                                       | {k for m in self.methods.values() for k in (m or {})}))
        if owned:
            raise SettingsError([f"{owned} are set by the sweep engine, not by a plan"])
        grid = {k: v if isinstance(v, list) else [v] for k, v in self.grid.items()}
        if "task" not in grid and "task" not in self.base:
            raise SettingsError(["a plan needs a task: in base or as a grid axis"])
        out, seen = [], set()
        self.waiting = {}
        for method, spec in self.methods.items():
            spec = dict(spec or {})
            local = {k: v for k, v in spec.items() if isinstance(v, list)}
            fixed = {k: v for k, v in spec.items() if not isinstance(v, list)}
            for values, names in _combinations(grid, local, self.task_settings, self.base.get("task")):
                axes = dict(zip(names, values))
                task = axes.get("task", self.base.get("task"))
                run_id = _run_id(method, axes)
                if self.only and not any(fnmatch.fnmatchcase(run_id, pattern) for pattern in self.only):
                    continue
                try:
                    selected = self._selection(str(task), method)
                except SettingsError as err:
                    if self.settled_only and (str(task), method) in self._unfinished:
                        self.waiting[(str(task), method)] = self._unfinished[(str(task), method)]
                    else:
                        problems.extend(err.problems)
                    continue
                settings = {**self.base, **self.task_settings.get(task, {}), **selected,
                            **self.task_settings.get(f"{task}/{method}", {}), **fixed, **axes, **self.overrides,
                            "output": "-"}
                try:
                    TrainSettings.from_dict(settings)
                except SettingsError as err:
                    problems.append(f"method {method!r} {axes}: {err}")
                    continue
                if run_id in seen:
                    problems.append(f"two runs share the id {run_id!r}")
                seen.add(run_id)
                settings.pop("output")
                out.append(PlannedRun(run_id, method, axes, settings))
        if problems:
            raise SettingsError(list(dict.fromkeys(problems)))  # one line per problem, not one per seed
        return out

    def _selection(self, task: str, method: str) -> dict[str, Any]:
        """The settings `select_from` chose for (task, method): {} without `select_from`.

        `select_from` names phase 1's plan file (then every run phase 1 plans for this task and method must have its
        result: an unfinished or partly failed phase 1 is refused, not silently chosen from) or its results folder
        (then a failed phase-1 run of this task and method is refused; runs still missing cannot be seen)."""
        if self.select_from is None:
            return {}
        if self._selected is None:
            self._selected, self._unfinished = _phase_one_choices(self.select_from)
        where = str(self.select_from)
        if (task, method) in self._unfinished:
            raise SettingsError([f"select_from {where!r}: phase 1 is not finished for task {task!r}, method "
                                 f"{method!r} ({self._unfinished[(task, method)]}); finish it first"])
        chosen = self._selected.get((task, method))
        if chosen is None:
            raise SettingsError([f"select_from {where!r} has no results (or several settings to choose among) for "
                                 f"task {task!r}, method {method!r}"])
        return dict(chosen)


def _phase_one_source(source: Path) -> tuple[Path, SweepPlan | None]:
    """(results folder, plan or None) of `select_from`: a phase-1 plan file (its `results`) or a results folder."""
    if source.is_file():
        phase_one = SweepPlan.load(source)
        if phase_one.results is None:
            raise SettingsError([f"select_from {str(source)!r}: that plan has no 'results' folder"])
        return phase_one.results, phase_one
    if source.is_dir():
        return source, None
    raise SettingsError([f"select_from {str(source)!r} is neither a phase-1 plan file nor a folder of results"])


def _phase_one_choices(source: Path) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[tuple[str, str], str]]:
    """(choices, unfinished) of a phase-1 plan file or results folder: the lr (and local axes) the report's rule picks
    per (task, method), and the (task, method) groups that cannot be chosen from yet, with the reason."""
    from .report_tables import Study
    from .results import load_results

    unfinished: dict[tuple[str, str], str] = {}
    folder, phase_one = _phase_one_source(source)
    if phase_one is not None:
        missing: dict[tuple[str, str], list[str]] = {}
        for run in phase_one.runs():
            key = (str(run.settings.get("task")), run.method)
            missing.setdefault(key, [])
            if not result_path(folder, run.run_id).is_file():
                missing[key].append(run.run_id)
        unfinished = {key: f"{len(ids)} of its runs have no result, e.g. {ids[0]!r}"
                      for key, ids in missing.items() if ids}
    for path in sorted(folder.glob("*.failed.json")):
        data = read_json(path) or {}
        key = (str((data.get("axes") or {}).get("task", (data.get("settings") or {}).get("task"))),
               str(data.get("method")))
        unfinished.setdefault(key, f"{path.name} failed")
    study = Study(load_results([folder]).runs) if folder.is_dir() else None
    choices = {key: {"lr": c[0].lr, **dict(c[0].local)}
               for key, c in (study.choices.items() if study else ()) if len(c) == 1}
    return choices, unfinished


def _combinations(grid: dict[str, list[Any]], local: dict[str, list[Any]],
                  task_settings: Mapping[str, Mapping[str, Any]],
                  base_task: Any = None) -> Iterator[tuple[tuple, list[str]]]:
    """Every combination of the grid's axes and a method's own (`local`), task by task: a task's settings may give a
    grid axis its own list of values for that task (e.g. a wider lr grid where the best lr sat at the edge)."""
    for key, values in task_settings.items():
        if "/" in str(key) and any(k in grid and isinstance(v, list) for k, v in (values or {}).items()):
            raise SettingsError([f"task_settings {key!r}: a list for a grid axis belongs to a task's own settings "
                                 "(every method of the task gets the same values), not to a task/method's"])
    for task in grid.get("task", [base_task]):
        own = {k: v for k, v in (task_settings.get(task) or {}).items()
               if k in grid and k != "task" and isinstance(v, list)} if task is not None else {}
        axes_lists = {**grid, **({"task": [task]} if "task" in grid else {}), **own, **local}
        names = list(axes_lists)
        for values in itertools.product(*axes_lists.values()):
            yield values, names


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model=/models/minilm", "epochs=2"]`` -> settings (values read as YAML scalars: numbers, true/false)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with a TrainSettings field as KEY")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


# ------------------------------------------------------------------------------------------------ execution
def pending(plan: SweepPlan, results: Path) -> tuple[list[PlannedRun], int]:
    """Runs without a result file yet, and how many are already done. With `select_from`, a finished run must have
    been trained at the setting chosen now (the run id does not hold the lr): a changed choice is refused, not
    mixed."""
    runs = plan.runs()
    todo = [r for r in runs if not result_path(results, r.run_id).is_file()]
    if plan.select_from is not None:
        changed = []
        for run in runs:
            path = result_path(results, run.run_id)
            stored = ((read_json(path) or {}).get("settings") or {}) if path.is_file() else {}
            keys = sorted({"lr", *plan._selection(str(run.settings.get("task")), run.method)})
            diffs = [f"{k} {stored.get(k)} -> {run.settings.get(k)}" for k in keys
                     if stored and stored.get(k) != run.settings.get(k)]
            if diffs:
                changed.append(f"{run.run_id} ({', '.join(diffs)})")
        if changed:
            raise UsageError(f"select_from now chooses other settings than {len(changed)} finished run(s) of "
                             f"{str(results)!r} were trained with: {'; '.join(changed[:3])}; move those results "
                             "away or restore phase 1's results")
    return todo, len(runs) - len(todo)


def measured_for(plan: SweepPlan, results: Path) -> list[dict[str, Any]]:
    """The finished runs that estimate this sweep's runs (`sweep_schedule.measured_runs`): those of `results` and,
    for a phase 2 (`select_from`), phase 1's, whose runs of a task and method are this phase's at other seeds (and
    lrs). Without them a phase 2's first runs of a task have no time estimate, so `--deadline` cannot hold them back,
    and reserve another task's peak."""
    from .sweep_schedule import measured_runs

    out = measured_runs(results)
    if plan.select_from is not None:
        with contextlib.suppress(LoradropError):  # a phase 1 it cannot read: the plan's runs were refused already
            folder = _phase_one_source(plan.select_from)[0]
            if folder.resolve() != Path(results).resolve():
                out += measured_runs(folder)
    return out


def run_sweep(plan: SweepPlan, results: str | Path | None = None, *, workers: int = 1,
              work_dir: str | Path | None = None, keep_runs: bool = False, progress: bool = True,
              gpus: list[int] | None = None, gpu_memory_gib: float | None = None,
              checkpoint_steps: int | None = None, laplace: str | None = None,
              deadline_s: float | None = None, gpu_gate: str | Path | None = None) -> dict[str, Any]:
    """Run every pending run of `plan` (`workers` at a time; with `gpus`, worker k trains on GPU gpus[k mod n],
    so one sweep fills a machine with several cards); returns counts and the failures.

    `gpu_memory_gib`: each GPU's memory budget; the workers' runs then reserve their estimated memory before they
    start (`sweep_schedule`); with `gpu_gate` (a file), against one table of reservations shared with every other
    sweep on this machine that names the same file (`sweep_schedule.SharedMemoryGate`). `checkpoint_steps`: every
    run saves a checkpoint this often, and a run interrupted earlier continues from its last one (`sweep_run`).
    `laplace`: the Laplace prior to fit after each plain-LoRA run, in the same worker (`laplace_sweep.score_one`);
    the fits of earlier LoRA runs whose folders are still in the work dir (a fit cut off by a time limit) come
    first. `deadline_s`: seconds from now by which runs must end; a run expected to end later is not started
    (``deferred`` in the summary; it stays pending). With measured runs in `results`, the longest start first."""
    from tqdm.auto import tqdm

    from .sweep_schedule import estimate, longest_first, positive_number, reservation

    results = Path(results) if results is not None else plan.results
    if results is None:
        raise UsageError("no results folder: give --results or a 'results' key in the plan")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be an integer >= 1, got {workers!r}")
    if gpus is not None and (not gpus or any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in gpus)
                             or len(set(gpus)) != len(gpus)):
        raise UsageError(f"gpus must be a non-empty list of distinct GPU indices >= 0, got {gpus!r}")
    if checkpoint_steps is not None and (isinstance(checkpoint_steps, bool) or not isinstance(checkpoint_steps, int)
                                         or checkpoint_steps < 1):
        raise UsageError(f"checkpoint_steps must be an integer >= 1, got {checkpoint_steps!r}")
    try:
        if gpu_memory_gib is not None:
            gpu_memory_gib = positive_number(gpu_memory_gib, "the gpu memory budget (GiB)")
        if deadline_s is not None:
            deadline_s = positive_number(deadline_s, "the deadline (seconds)")
    except ValueError as err:
        raise UsageError(str(err)) from None
    gate = shared_gate(gpu_gate, gpu_memory_gib)
    finish_by = time.time() + deadline_s if deadline_s is not None else None
    results.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir is not None else results.parent / f".{results.name}.runs"
    todo, done = pending(plan, results)
    fits = plan_laplace(results, work, only=plan.only).todo if laplace is not None else []
    if gpus and (workers == 1 or len(todo) + len(fits) <= 1):  # runs in this process: set before CUDA is touched
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[0])
    summary: dict[str, Any] = {"planned": len(todo) + done, "skipped": done, "ok": 0, "failed": [], "deferred": []}
    measured = measured_for(plan, results) if todo or fits else []
    fits_measured = [m for m in measured if m["method"] == LAPLACE_METHOD]  # a fit's time: only other fits'
    runs_measured = [m for m in measured if m["method"] != LAPLACE_METHOD]  # a run's: only other runs'
    estimates = {}
    for run in todo:
        task = run.settings.get("task")
        found = estimate(task, run.method, run.settings, runs_measured)
        if laplace is not None and run.method == LAPLACE_SOURCE_METHOD:  # its fit runs in the same reservation
            fit = estimate(task, LAPLACE_METHOD, run.settings, fits_measured)
            if fit.memory_gib and (found.memory_gib or 0) < fit.memory_gib:
                found = replace(found, memory_gib=fit.memory_gib)
            if found.seconds is not None:  # the fit runs in the same job, after training; unmeasured, it is taken
                # to last as long as the run (KFAC over the train split is one to two epochs' passes, plus the
                # test and OOD sets' Jacobians): a deadline must not start a run whose fit it would cut off
                found = replace(found, seconds=found.seconds + (fit.seconds if fit.seconds is not None
                                                                else found.seconds))
        estimates[run.run_id] = found
    order = longest_first([r.run_id for r in todo], {k: e.seconds for k, e in estimates.items()})
    by_id = {r.run_id: r for r in todo}
    per_gpu = -(-min(workers, max(1, len(todo) + len(fits))) // len(gpus or [0]))  # workers sharing a GPU (rounded up)
    share = (gpu_memory_gib or 0.0) / per_gpu  # an unknown run's reservation: an even share of its GPU
    jobs: list[RunJob | FitJob] = []
    for fit in fits:  # first: each needs its run folder, which lives only as long as this machine
        settings = fit.source.get("settings") or {}
        found = estimate(settings.get("task"), LAPLACE_METHOD, settings, fits_measured)
        jobs.append(FitJob(fit, results, work, laplace, keep_runs, dict(plan.overrides),
                           reservation(found, gpu_memory_gib, share) if gpu_memory_gib else None, found.seconds,
                           finish_by))
    jobs += [RunJob(by_id[k], plan.name, results, work, keep_runs, checkpoint_steps, laplace, dict(plan.overrides),
                    reservation(estimates[k], gpu_memory_gib, share) if gpu_memory_gib else None,
                    estimates[k].seconds, finish_by) for k in order]
    bar = tqdm(total=len(jobs), desc=f"sweep {plan.name}", unit="run", disable=not progress)
    for status in _statuses(jobs, workers, gpus, gpu_memory_gib, gate=gate):
        if status["status"] == "deferred":
            summary["deferred"].append(status["run_id"])
        elif status["status"] == "ok":
            if not status.get("fit_only"):
                summary["ok"] += 1
            elif status.get("laplace") == "ok":  # a fit of an earlier run (a failed one is listed below)
                summary["laplace_ok"] = summary.get("laplace_ok", 0) + 1
            if status.get("laplace") not in (None, "ok"):
                summary.setdefault("laplace_failed", []).append({"run_id": status["run_id"],
                                                                 "error": status["laplace"]})
        else:
            summary["failed"].append(status)
            bar.write(f"failed: {status['run_id']}: {status['error']}")
        bar.update(1)
    bar.close()
    return summary


def shared_gate(path: str | Path | None, gpu_memory_gib: float | None) -> Any:
    """The `SharedMemoryGate` of ``--gpu-gate`` (None without one), or a UsageError naming what is wrong."""
    if path is None:
        return None
    if gpu_memory_gib is None:
        raise UsageError("--gpu-gate shares a memory budget: give it with --gpu-memory GIB")
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"--gpu-gate {str(path)!r}: its folder does not exist")
    from .sweep_schedule import SharedMemoryGate

    try:
        return SharedMemoryGate(path, gpu_memory_gib)
    except ImportError:
        raise UsageError("--gpu-gate needs POSIX file locks (fcntl), which this system lacks") from None


def _statuses(jobs: list[Any], workers: int, gpus: list[int] | None = None, gpu_memory_gib: float | None = None,
              target: Any = execute_in_worker, gate: Any = None) -> Iterator[dict]:
    """Each job's status as it ends: in this process one at a time, or in a pool of `workers` spawned processes
    (`target`: what a worker runs per job; a job whose worker dies is reported failed, `tracked_results`). `gate`: a
    `SharedMemoryGate` (other sweeps' runs share the GPU), else the pool gets its own `MemoryGate`."""
    if workers == 1 or len(jobs) <= 1:  # one run at a time: only another sweep's runs can share the GPU
        for job in jobs:
            yield run_job(job) if gate is None else run_gated(job, gate, (gpus or [0])[0])
        return
    import multiprocessing

    from .sweep_schedule import MemoryGate

    # spawn: CUDA cannot be used in forked children; each worker imports the libraries once and trains many runs.
    # Progress bars read TQDM_DISABLE when tqdm is imported, so the children get it in their environment.
    context = multiprocessing.get_context("spawn")
    size = min(workers, len(jobs))
    if gate is None and gpu_memory_gib is not None:
        gate = MemoryGate(context, gpus or [0], gpu_memory_gib, workers=size)
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    started = context.Array("i", len(jobs), lock=False)  # job index -> pid of its worker (0: not started)
    pool = context.Pool(size, initializer=worker_init, initargs=(gpus, gate, started))
    try:
        died = yield from tracked_results(pool, jobs, started, target)
        if died:  # every job has answered either way
            pool.terminate()
        else:
            pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


__all__ = ["PlannedRun", "RunJob", "SweepPlan", "execute", "pending", "result_path", "run_sweep", "shared_gate",
           "worker_gpu", "worker_init"]
