"""Run folders: planning fresh runs, refusing to clobber, finding what --resume continues; atomic JSON writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loradrop.app.runfolder import (
    RUN_CONFIG_FILE,
    checkpoints,
    plan_run,
    publish,
    read_json,
    staging_path,
    stored_settings,
    write_json,
    write_jsonl,
)
from loradrop.errors import UsageError


def test_fresh_run_is_staged_beside_the_output(tmp_path: Path) -> None:
    plan = plan_run(tmp_path / "run", resume=False, overwrite=False)
    assert plan.work == tmp_path / ".run.partial" == staging_path(tmp_path / "run")
    assert plan.staging and plan.fresh and plan.resume_from is None
    plan.work.mkdir()
    (plan.work / "metrics.json").write_text("{}")
    publish(plan)
    assert (tmp_path / "run" / "metrics.json").is_file() and not plan.work.exists()


def test_busy_output_and_interrupted_runs_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("1")
    with pytest.raises(UsageError, match="exists and is not empty"):
        plan_run(out, resume=False, overwrite=False)
    assert plan_run(out, resume=False, overwrite=True).fresh
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is not a folder"):
        plan_run(tmp_path / "file", resume=False, overwrite=False)
    (staging_path(tmp_path / "other") / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(UsageError, match="interrupted run"):
        plan_run(tmp_path / "other", resume=False, overwrite=False)
    with pytest.raises(UsageError, match="exclude each other"):
        plan_run(out, resume=True, overwrite=True)


def test_resume_picks_the_last_complete_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="no checkpoint"):
        plan_run(out, resume=True, overwrite=False)
    staging = staging_path(out)
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-x", ".staging"):
        (staging / name).mkdir(parents=True)
    assert [p.name for p in checkpoints(staging)] == ["checkpoint-2", "checkpoint-10"]
    plan = plan_run(out, resume=True, overwrite=False)
    assert plan.work == staging and plan.staging and not plan.fresh and plan.resume_from.name == "checkpoint-10"
    assert stored_settings(plan) is None
    write_json(staging / RUN_CONFIG_FILE, {"args": {"lr": 0.1}})
    assert stored_settings(plan) == {"lr": 0.1}
    (out / "checkpoint-4").mkdir(parents=True)  # a finished run folder is continued in place
    plan = plan_run(out, resume=True, overwrite=False)
    assert plan.work == out and not plan.staging and plan.resume_from.name == "checkpoint-4"


def test_json_writes_are_atomic_and_readable(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"path": tmp_path, "s": {2, 1}})
    assert read_json(tmp_path / "a.json") == {"path": str(tmp_path), "s": [1, 2]}
    write_jsonl(tmp_path / "rows.jsonl", [{"i": 1}, {"i": 2}])
    assert [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()] == [{"i": 1}, {"i": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "rows.jsonl"]
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UsageError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
