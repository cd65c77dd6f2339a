"""The files of a sweep's results: each run's id (its file name), its result path, and the per-example predictions
a result carries (read from the run folder's JSONL files, stored as columns). Shared by the sweep's plan
(`sweep`), the worker that trains one run (`sweep_run`) and the Laplace step (`laplace_sweep`), which otherwise would
import each other."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# result key -> the run folder's predictions file it is read from
PREDICTION_FILES = {"test": "predictions.jsonl", "validation": "validation_predictions.jsonl",
                    "best_epoch_test": "best_epoch_test_predictions.jsonl",
                    "best_epoch_validation": "best_epoch_validation_predictions.jsonl", "ood": "ood_predictions.jsonl"}


def _value_text(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def _name_text(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in str(name))


def run_id(method: str, axes: Mapping[str, Any]) -> str:
    """``<task>__<method>__<axis>-<value>_...`` (the task first, the rest sorted), safe as a file name."""
    task = axes.get("task")
    rest = "_".join(f"{k}-{_value_text(v)}" for k, v in sorted(axes.items()) if k != "task")
    return "__".join(x for x in (_value_text(task) if task is not None else None, _name_text(method), rest) if x)


def result_path(results: Path, run_id: str) -> Path:
    return results / f"{run_id}.json"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL predictions file ([] when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def compact_predictions(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per-example predictions as columns (probabilities rounded to 6 digits)."""
    if not rows:
        return None

    def col(key: str) -> list[Any] | None:
        if key not in rows[0]:
            return None
        values = [r[key] for r in rows]
        if isinstance(values[0], list):
            return [[round(float(x), 6) for x in v] for v in values]
        return [round(float(v), 6) if isinstance(v, float) else v for v in values]

    out = {k: col(k) for k in ("id", "label", "single_probs", "ensemble_probs", "single", "ensemble_mean")}
    if "uncertainty" in rows[0]:
        out["uncertainty"] = {k: [round(float(r["uncertainty"][k]), 6) for r in rows]
                              for k in rows[0]["uncertainty"]}
    return {k: v for k, v in out.items() if v is not None}


__all__ = ["PREDICTION_FILES", "compact_predictions", "read_rows", "result_path", "run_id"]
