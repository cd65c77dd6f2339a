"""Run folders: where a run works, how it becomes visible atomically, and what ``--resume`` continues.

A fresh run is built in a hidden staging folder next to the output (``.NAME.partial``) and renamed into place at
the end, so a failed run leaves no partial output folder. A run interrupted after a checkpoint keeps its staging
folder, and ``resume`` continues it (or continues a finished run folder in place) from its last complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import write_json_atomic
from ..errors import UsageError
from .provenance import jsonable

METRICS_FILE = "metrics.json"
EVAL_METRICS_FILE = "eval_metrics.json"
RUN_CONFIG_FILE = "run_config.json"
ADAPTER_DIR = "adapter"
LOG_FILE = "train.log"
PREDICTIONS_FILE = "predictions.jsonl"
VALIDATION_PREDICTIONS_FILE = "validation_predictions.jsonl"
STATUS_FILE = "run_status.json"  # only in a run whose evaluation failed
LOSS_HISTORY_FILE = "loss_history.json"


@dataclass
class RunPlan:
    """Where a train run works and ends up."""

    output: Path  # the final run folder
    work: Path  # where training happens: the staging folder or, when resuming a finished run, the output itself
    staging: bool  # whether `work` is renamed to `output` at the end
    resume_from: Path | None  # checkpoint to continue from
    fresh: bool  # whether `work` is (re)created empty


def staging_path(output: Path) -> Path:
    """The hidden folder next to `output` where a run is built."""
    return output.parent / f".{output.name}.partial"


def checkpoints(folder: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders (the Trainer renames them into place atomically), by step."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def plan_run(output: str | Path, *, resume: bool, overwrite: bool) -> RunPlan:
    """Decide the run folders from output/resume/overwrite, without touching the disk."""
    output = Path(output).expanduser()
    staging = staging_path(output)
    check_output_path(output.parent)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} exists and is not a folder")
    if resume:
        for folder, is_staging in ((output, False), (staging, True)):
            found = checkpoints(folder)
            if found:
                return RunPlan(output, folder, is_staging, found[-1], fresh=False)
        where = f"{str(output)!r}" + (f" or the interrupted run in {str(staging)!r}" if staging.exists() else "")
        raise UsageError(f"--resume: no checkpoint-N folder in {where} to continue from (train with --save-steps)")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UsageError(f"--output {str(output)!r} exists and is not empty; pass --resume to continue it, "
                         "--overwrite to replace it, or another --output")
    if checkpoints(staging) and not overwrite:
        raise UsageError(f"an interrupted run of {str(output)!r} is in {str(staging)!r}; pass --resume to continue "
                         "it or --overwrite to start over")
    return RunPlan(output, staging, True, None, fresh=True)


def stored_settings(plan: RunPlan) -> dict[str, Any] | None:
    """The settings recorded by the run being resumed (None for a fresh run)."""
    path = plan.work / RUN_CONFIG_FILE
    if plan.fresh or not path.is_file():
        return None
    return read_json(path).get("args", {})


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file, with a message naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err}); was it written by loradrop?") from err


def write_json(path: Path, value: Any, *, compact: bool = False) -> None:
    """Write JSON atomically (a temporary file renamed into place), values made JSON-ready first; `compact` writes
    one line without indentation (for large result files)."""
    if not compact:
        write_json_atomic(path, jsonable(value))
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(jsonable(value), sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON object a line, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(jsonable(row), sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def replace_dir(source: Path, target: Path) -> None:
    """Move `source` onto `target`, replacing a previous `target`."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(source, target)


def publish(plan: RunPlan) -> None:
    """Move a finished staging folder into place as the run folder."""
    if not plan.staging:
        return
    if plan.output.exists():
        shutil.rmtree(plan.output)
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(plan.work, plan.output)


LOCK_SUFFIX = ".lock"


def lock_path(output: Path) -> Path:
    """The lock file beside a run folder (it exists while a process owns the run)."""
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


def pid_alive(pid: int) -> bool:
    """Whether a process of that id exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def run_lock(output: Path) -> Iterator[None]:
    """Own the run folder `output` for the duration: a second process is refused with who holds it; a lock left by
    a process that no longer runs on this host (a crash, SIGKILL) is taken over."""
    import socket
    import time

    check_output_path(output)
    path = lock_path(output)
    host = socket.gethostname()
    owner = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the folder of --output {str(output)!r}: {err.strerror or err}") from err
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                held = {}
            if held.get("host") == host and isinstance(held.get("pid"), int) and not pid_alive(held["pid"]):
                logging.getLogger("loradrop.app").warning("loradrop: removing the stale lock %s of pid %s", path,
                                                          held["pid"])
                path.unlink(missing_ok=True)
                continue
            raise UsageError(f"--output {str(output)!r} is in use by pid {held.get('pid', '?')} on host "
                             f"{held.get('host', '?')} (since {held.get('since', '?')}); wait for that run, choose "
                             f"another --output, or delete {str(path)!r} if that process is gone") from None
        except OSError as err:
            raise UsageError(f"cannot write beside --output {str(output)!r}: {err.strerror or err}") from err
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(owner, fh)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def check_output_path(output: Path) -> None:
    """Refuse an output whose parent path runs through a file."""
    for parent in [output, *output.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--output {str(output)!r}: {str(parent)!r} is a file, not a folder")
            return


@contextmanager
def run_log(path: Path | None) -> Iterator[None]:
    """Copy the transformers and loradrop loggers (INFO and up) into `path` without flooding the console."""
    if path is None:
        yield
        return
    from transformers.utils import logging as hf_logging

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    hf_root = hf_logging.get_logger("transformers")
    ours = logging.getLogger("loradrop")
    saved = (hf_root.level, ours.level, [(h, h.level) for h in hf_root.handlers])
    console_level = hf_logging.get_verbosity()
    for h in hf_root.handlers:  # the console keeps transformers' own verbosity
        h.setLevel(max(h.level, console_level))
    hf_root.setLevel(logging.INFO)
    ours.setLevel(logging.INFO)
    hf_root.addHandler(handler)
    ours.addHandler(handler)
    try:
        yield
    finally:
        hf_root.removeHandler(handler)
        ours.removeHandler(handler)
        handler.close()
        hf_root.setLevel(saved[0])
        ours.setLevel(saved[1])
        for h, level in saved[2]:
            h.setLevel(level)
