"""The command line starts fast: building the parser (``--help``, argument errors) imports none of the heavy
libraries, and ``loradrop tasks`` lists the registry from its catalog without loading any task module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loradrop.cli import main
from loradrop.tasks import CATALOG, catalog_data_root, trainable_task_names

HEAVY = ("torch", "transformers", "peft", "datasets")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_no_heavy_library() -> None:
    assert _loaded_after("import loradrop.cli; loradrop.cli.build_parser()") == []


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--task", "nope", "--output", "x"],
                                  ["tasks"]])
def test_help_argument_errors_and_tasks_import_no_heavy_library(argv: list[str]) -> None:
    code = f"import loradrop.cli\ntry:\n    loradrop.cli.main({argv!r})\nexcept SystemExit:\n    pass"
    assert _loaded_after(code) == []


def test_settings_errors_import_no_heavy_library() -> None:
    code = ("from loradrop.app import TrainSettings\ntry:\n    TrainSettings(task='rte', output='x', p=2)\n"
            "except Exception:\n    pass")
    assert _loaded_after(code) == []


def test_the_catalog_is_the_registry() -> None:
    from loradrop.tasks import TASKS

    assert {n: (s.family, s.kind, s.metric_names, s.trainable) for n, s in TASKS.items()} == {
        n: e[:4] for n, e in CATALOG.items()}
    assert set(trainable_task_names()) == {n for n, s in TASKS.items() if s.trainable} | {"instruct"}


def test_catalog_data_root_follows_the_loaders(tmp_path, monkeypatch) -> None:
    from loradrop.tasks import find_data_root

    monkeypatch.setenv("LORADROP_DATA_DIR", str(tmp_path))
    assert catalog_data_root()[0] == find_data_root() == tmp_path
    assert catalog_data_root(tmp_path / "x") == (tmp_path / "x", "--data-dir")


def test_tasks_lists_every_task_and_where_it_looked(tmp_path, capsys) -> None:
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    (tmp_path / "glue" / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    assert main(["tasks", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"data root: {tmp_path}, from --data-dir" in out
    lines = {line.split()[0]: line for line in out.splitlines()[3:] if line.split() and line.split()[0] in CATALOG}
    assert set(lines) == set(CATALOG)
    assert "present" in lines["rte"] and str(tmp_path / "glue" / "RTE" / "dev.tsv") in lines["rte"]
    assert "missing" in lines["sst2"] and str(tmp_path / "glue" / "SST-2" / "dev.tsv") in lines["sst2"]
    assert "eval only" in lines["mmlu"] and "accuracy, f1" in lines["mrpc"]

    assert main(["tasks", "--data-dir", str(tmp_path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_name = {row["task"]: row for row in listing["tasks"]}
    assert listing["root"] == str(tmp_path) and by_name["rte"]["data"] == "present"
    assert by_name["stsb"] == {**by_name["stsb"], "family": "glue", "kind": "regression", "data": "missing"}
