"""``loradrop tasks``: every registered task with its family, kind and metrics, and whether its data is present
(and where the loaders look). Reads the registry's catalog (`loradrop.tasks.CATALOG`), so it imports neither
``datasets`` nor torch and answers at once."""

from __future__ import annotations

import os
from typing import Any

from ..tasks import CATALOG, INSTRUCT_ALIAS, catalog_data_root, task_data_location
from .plots import format_table


def list_tasks(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"root": ..., "root_from": ..., "tasks": [{"task", "family", "kind", "metrics", "trainable", "data",
    "where"}, ...]}`` for the data root that ``--data-dir`` / ``$LORADROP_DATA_DIR`` / ``../shared/data`` picks."""
    root, root_from = catalog_data_root(data_dir)
    rows = []
    for name, entry in CATALOG.items():
        present, where = task_data_location(name, root)
        rows.append({"task": name, "family": entry.family, "kind": entry.kind, "metrics": ", ".join(entry.metrics),
                     "trainable": entry.trainable, "data": "present" if present else "missing", "where": where})
    return {"root": None if root is None else str(root), "root_from": root_from,
            "root_exists": root is not None and root.exists(), "tasks": rows}


def format_tasks(listing: dict[str, Any]) -> str:
    """The listing as a table, with the data root it looked in and the ``instruct`` alias explained."""
    root = listing["root"]
    state = "" if listing["root_exists"] else " (does not exist)"
    head = (f"data root: {root}{state}, from {listing['root_from']}" if root
            else f"data root: none ({listing['root_from']})")
    rows = [{**row, "trainable": "yes" if row["trainable"] else "eval only"} for row in listing["tasks"]]
    table = format_table(rows, ("task", "family", "kind", "metrics", "trainable", "data", "where"))
    return (f"{head}\n{table}\n`--task {INSTRUCT_ALIAS}`: alpaca, or lima when --data-dir is a LIMA file; mmlu is "
            "the evaluation set of instruction runs")
