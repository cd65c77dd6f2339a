"""Laplace-LoRA results for a sweep: ``loradrop sweep PLAN --laplace`` (or `laplace_sweep` from Python) turns the
plain-LoRA runs of a results folder into results of method ``laplace``, in the sweep's own result format, so
``loradrop report`` shows a Laplace-LoRA row beside the trained methods.

For every result of method ``lora`` (``<results>/<run id>.json``) whose run folder the sweep kept (``--keep-runs``:
``<work dir>/<run id>/``, by default ``<results>/../.<results name>.runs/``), the Laplace baseline
(`loradrop.app.laplace_baseline`, through `eval_run.evaluate` with ``laplace=...``: KFAC over the LoRA factors, fitted
on the run's train rows, prior tuned on its validation split) scores the run's test split and, when the run had
``ood_task``, its OOD sets with the same posterior. It writes ``<task>__laplace__<same axes>.json`` beside the sweep's
results: same plan, task, lr and seed as the source run (so the report's selection and seeds line up), and

- ``metrics``: the evaluation's ``eval_metrics.json``, i.e. ``eval.single`` the MAP (the source run's own single
  pass, recomputed) and ``eval.ensemble`` the Laplace predictive (accuracy, ECE, NLL, Brier), the ``laplace`` section
  (prior, sizes, seconds), and ``uncertainty`` (selective prediction, OOD sets: MAP and Laplace metrics, AUROC).
  This is the layout of ``loradrop eval --laplace``, which the report reads (its Laplace-LoRA row is the
  ``ensemble`` pass, the OOD tables read ``ood_sets[*].metrics.ensemble``). ``best_epoch`` (without its test
  numbers) and ``eval.validation.single`` are the source run's validation scores (the MAP is that run's model), so
  the report's selection chooses a Laplace fit's lr by its LoRA run's validation score, as it chose LoRA's;
- ``predictions``: ``test`` and, with OOD sets, ``ood`` / ``ood_sets`` in the column layout of
  `sweep_files.compact_predictions`
  (``single_probs`` the MAP, ``ensemble_probs`` the Laplace predictive);
- ``settings`` / ``axes``: the source run's; ``laplace_settings``: the evaluation's; ``source``: the run it came
  from; ``versions``, ``hardware``, ``wall_time_s``, ``peak_memory_mib``.

A result that exists is skipped (a killed step continues where it stopped); a run that fails writes
``<laplace id>.failed.json`` with the traceback and is tried again next time; a ``lora`` result without its run
folder is reported as missing (it was trained without ``--keep-runs``)."""

from __future__ import annotations

import fnmatch
import json
import shutil
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .provenance import hardware, versions
from .results import SCHEMA
from .runfolder import ADAPTER_DIR, write_json
from .settings import LAPLACE_PRIORS
from .sweep_files import compact_predictions, read_rows, result_path
from .sweep_files import run_id as sweep_run_id

SOURCE_METHOD = "lora"
METHOD = "laplace"
EVAL_KEYS = ("model", "data_dir")  # sweep overrides (``--set``) that also apply to the evaluation


@dataclass(frozen=True)
class LaplaceJob:
    """One source run to score: its result file and data, its kept run folder, and the Laplace result's id."""

    source_path: Path
    source: dict[str, Any]
    run_folder: Path
    run_id: str


@dataclass
class LaplacePlan:
    """What a Laplace step over one results folder has to do."""

    todo: list[LaplaceJob]
    done: list[str]  # Laplace results that exist already
    missing: list[str]  # source runs whose run folder is gone (trained without --keep-runs)


def default_work_dir(results: Path) -> Path:
    """Where `sweep.run_sweep` builds (and with ``keep_runs`` keeps) the run folders of `results`."""
    return results.parent / f".{results.name}.runs"


def laplace_run_id(source: Mapping[str, Any]) -> str:
    """The Laplace result's id: the source run's id with the method ``laplace`` (same axes)."""
    return sweep_run_id(METHOD, source.get("axes") or {})


def plan_laplace(results: str | Path, work_dir: str | Path | None = None, *, source_method: str = SOURCE_METHOD,
                 only: Sequence[str] = ()) -> LaplacePlan:
    """The Laplace jobs of `results`: every successful `source_method` result (whose run id or Laplace id matches a
    glob of `only`, when given) without a Laplace result yet."""
    results = Path(results)
    if not results.is_dir():
        raise UsageError(f"results folder {str(results)!r} does not exist (run the sweep first)")
    work = Path(work_dir) if work_dir is not None else default_work_dir(results)
    plan = LaplacePlan([], [], [])
    for path in sorted(results.glob("*.json")):
        if path.name.endswith(".failed.json"):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a result: load_results leaves it aside too
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("status") != "ok" \
                or data.get("method") != source_method:
            continue
        source_id, run_id = str(data.get("run_id", path.stem)), laplace_run_id(data)
        if only and not any(fnmatch.fnmatchcase(i, p) for p in only for i in (source_id, run_id)):
            continue
        if result_path(results, run_id).is_file():
            plan.done.append(run_id)
        elif not (work / source_id / ADAPTER_DIR / "adapter_config.json").is_file():
            plan.missing.append(source_id)
        else:
            plan.todo.append(source_job(path, data, work / source_id))
    return plan


def unfitted_at_lora_choice(results: str | Path, missing: Sequence[str], unsettled: Iterable[str] = ()) -> list[str]:
    """Of `missing` (LoRA runs whose run folder is gone, so no Laplace fit can be made from them), those at LoRA's
    chosen setting of their task (the report's selection over `results`): the runs the report's Laplace-LoRA row is
    read from. Deleting their results trains them again, with their fits, in the next ``--laplace`` sweep. Tasks in
    `unsettled` (LoRA runs of theirs still to train) are left out: their choice may still move."""
    from ..tasks import task_key
    from .report_tables import Study
    from .results import load_results

    study = Study(load_results([Path(results)]).runs)
    unsettled = {task_key(t) for t in unsettled}
    chosen = {run.run_id for (task, method), choices in study.choices.items()
              if method == SOURCE_METHOD and len(choices) == 1 and task_key(task) not in unsettled
              for run in choices[0].runs}
    return [run_id for run_id in missing if run_id in chosen]


def _selection_score(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The source run's best-epoch record without its test numbers (what `report_tables.validation_score` reads)."""
    best = metrics.get("best_epoch")
    return {k: v for k, v in best.items() if k != "test"} if isinstance(best, dict) else None


def laplace_result(job: LaplaceJob, output: Path, *, prior: str = "auto",
                   overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the Laplace evaluation of one source run (writing its files to `output`) and return the sweep result."""
    from .eval_run import evaluate
    from .provenance import peak_memory, reset_peak_memory
    from .settings import EvalSettings

    settings = job.source.get("settings") or {}
    eval_args = {"adapter": str(job.run_folder), "laplace": prior, "output": str(output),
                 "ood_task": settings.get("ood_task"), "data_dir": settings.get("data_dir"),
                 **{k: v for k, v in (overrides or {}).items() if k in EVAL_KEYS}}
    eval_settings = EvalSettings.from_dict(eval_args)
    reset_peak_memory()
    start = time.perf_counter()
    metrics = dict(evaluate(eval_settings).metrics)
    wall = time.perf_counter() - start
    metrics["config"] = {**metrics.get("config", {}), "ensemble_kind": METHOD}
    source_metrics = job.source.get("metrics") or {}
    selection = _selection_score(source_metrics)
    if selection is not None:
        metrics["best_epoch"] = {**selection, "source": "the source LoRA run's selection score"}
    validation = ((source_metrics.get("eval") or {}).get("validation") or {}).get("single")
    if validation is not None:  # the MAP is the source run's model: its validation score is the MAP's
        metrics["eval"] = {**metrics["eval"], "validation": {"single": validation}}
    predictions: dict[str, Any] = {"test": compact_predictions(read_rows(output / metrics["files"]["predictions"]))}
    ood_sets = (metrics.get("uncertainty") or {}).get("ood_sets") or []
    if ood_sets:  # as sweep_run.execute: the first set is also `ood`
        predictions["ood_sets"] = {part["task"]: compact_predictions(read_rows(output / part["predictions"]))
                                   for part in ood_sets}
        predictions["ood"] = predictions["ood_sets"][ood_sets[0]["task"]]
    return {"schema": SCHEMA, "plan": job.source.get("plan", ""), "run_id": job.run_id, "method": METHOD,
            "axes": job.source.get("axes") or {}, "settings": settings, "laplace_settings": eval_settings.to_dict(),
            "source": {"run_id": job.source.get("run_id"), "result": job.source_path.name,
                       "run_folder": str(job.run_folder)},
            "status": "ok", "versions": versions(), "hardware": hardware(), "wall_time_s": wall,
            "peak_memory_mib": peak_memory(), "metrics": metrics, "predictions": predictions}


def source_job(source_path: Path, source: dict[str, Any], run_folder: Path) -> LaplaceJob:
    """The Laplace job of one ``lora`` result (its predictions and loss history left out) and its run folder."""
    source = {k: v for k, v in source.items() if k not in ("predictions", "loss_history")}
    return LaplaceJob(source_path, source, run_folder, laplace_run_id(source))


def score_one(job: LaplaceJob, results: Path, work: Path, *, prior: str = "auto",
              overrides: Mapping[str, Any] | None = None, keep_outputs: bool = False) -> dict[str, Any]:
    """Fit and score one job, writing ``<results>/<laplace id>.json`` (or ``.failed.json`` with the traceback, and
    never raising for a failed fit); returns ``{"run_id", "status", "error"?}``. Called after a whole sweep
    (`laplace_sweep`) or by the sweep's worker right after it trains the source run (`sweep_run.execute`)."""
    failed = results / f"{job.run_id}.failed.json"
    output = work / job.run_id
    start = time.perf_counter()
    try:
        write_json(result_path(results, job.run_id),
                   laplace_result(job, output, prior=prior, overrides=overrides), compact=True)
        failed.unlink(missing_ok=True)
        return {"run_id": job.run_id, "status": "ok", "seconds": time.perf_counter() - start}
    except Exception as err:  # one failed fit must not stop the others; the error is kept with its traceback
        error = f"{type(err).__name__}: {err}"
        write_json(failed, {"schema": SCHEMA, "run_id": job.run_id, "method": METHOD,
                            "axes": job.source.get("axes") or {}, "settings": job.source.get("settings") or {},
                            "status": "failed", "error": error, "traceback": traceback.format_exc(),
                            "seconds": time.perf_counter() - start})
        return {"run_id": job.run_id, "status": "failed", "error": error}
    finally:
        if not keep_outputs:
            shutil.rmtree(output, ignore_errors=True)


def laplace_sweep(results: str | Path, work_dir: str | Path | None = None, *, prior: str = "auto",
                  source_method: str = SOURCE_METHOD, only: Sequence[str] = (),
                  overrides: Mapping[str, Any] | None = None, keep_outputs: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Write the Laplace result of every pending source run of `results` (see the module docstring); returns counts
    (``planned``, ``skipped``, ``ok``), the ``missing`` source runs and the ``failed`` ones (id and error).
    `overrides`: the sweep's ``--set`` values (only `EVAL_KEYS` apply: a local model folder, the data root).
    The evaluation's own files go to ``<work dir>/<laplace id>/`` and are removed unless `keep_outputs`."""
    from tqdm.auto import tqdm

    from .laplace_baseline import require_laplace

    if prior not in LAPLACE_PRIORS:
        raise UsageError(f"laplace={prior!r}: allowed {list(LAPLACE_PRIORS)}")
    plan = plan_laplace(results, work_dir, source_method=source_method, only=only)
    results = Path(results)
    work = Path(work_dir) if work_dir is not None else default_work_dir(results)
    summary: dict[str, Any] = {"planned": len(plan.todo) + len(plan.done), "skipped": len(plan.done), "ok": 0,
                               "missing": plan.missing, "failed": []}
    if plan.todo:
        require_laplace()  # one clear line before any model is loaded
    bar = tqdm(total=len(plan.todo), desc=f"laplace {results.name}", unit="run", disable=not progress)
    for job in plan.todo:
        status = score_one(job, results, work, prior=prior, overrides=overrides, keep_outputs=keep_outputs)
        if status["status"] == "ok":
            summary["ok"] += 1
        else:
            summary["failed"].append(status)
            bar.write(f"failed: {job.run_id}: {status['error']}")
        bar.update(1)
    bar.close()
    return summary


__all__ = ["METHOD", "SOURCE_METHOD", "LaplaceJob", "LaplacePlan", "default_work_dir", "laplace_result",
           "laplace_run_id", "laplace_sweep", "plan_laplace", "score_one",
           "source_job"]
