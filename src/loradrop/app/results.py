"""Reading sweep results back: the result schema and `load_results` (every successful run of some folders, with the
failed and unreadable files counted), shared by `loradrop report` and the sweep's `select_from` (which would
otherwise import the report, which imports the sweep)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report_tables import Run

SCHEMA = "loradrop.sweep.run/1"


@dataclass
class Loaded:
    """What the results folders hold: the runs to report, failed runs, and files left aside."""

    runs: list[Run] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)  # JSON files that are not sweep results
    duplicates: list[Path] = field(default_factory=list)  # a second result of the same run (first one kept)
    ok_per_folder: dict[str, int] = field(default_factory=dict)


def load_results(folders: Sequence[Path]) -> Loaded:
    """Every sweep result under `folders` (recursively, in sorted path order)."""
    loaded = Loaded()
    seen: dict[tuple, Path] = {}
    files: dict[Path, tuple[str, Path]] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.json")):
            files.setdefault(path.resolve(), (str(folder), path))
    for folder, path in sorted(files.values(), key=lambda fp: str(fp[1])):
        loaded.ok_per_folder.setdefault(folder, 0)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            loaded.ignored.append(path)
            continue
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            loaded.ignored.append(path)
        elif path.name.endswith(".failed.json") or data.get("status") != "ok":
            error = str(data.get("error") or data.get("status") or "?").strip().splitlines() or ["?"]
            loaded.failed.append({"folder": folder, "run_id": data.get("run_id", path.stem), "error": error[0][:160]})
        else:
            run = Run.from_result(path, data)
            key = (run.task, run.method, run.local, run.lr, run.seed)
            if key in seen:
                loaded.duplicates.append(path)
                continue
            seen[key] = path
            loaded.runs.append(run)
            loaded.ok_per_folder[folder] += 1
    return loaded


def recorded_model(run: Run) -> str:
    """The model a run recorded: the path or hub name it was trained from (`metrics.model`, else its settings')."""
    return str(run.metrics.get("model") or run.settings.get("model"))


def model_labels(runs: Sequence[Run], names: Mapping[str, str] | None = None) -> list[str]:
    """The models `runs` recorded, each under its name in `names` (``loradrop report --model-name``) if it has one."""
    names = names or {}
    return sorted({names.get(model, model) for model in map(recorded_model, runs)})


__all__ = ["SCHEMA", "Loaded", "load_results", "model_labels", "recorded_model"]
