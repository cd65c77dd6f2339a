"""``loradrop sweep PLAN --laplace`` (`loradrop.app.laplace_sweep`): the kept plain-LoRA runs of a sweep become
results of method ``laplace`` that ``loradrop report`` shows as the Laplace-LoRA row (issue #14). The end-to-end test
needs laplace-torch (optional) and the commonsense data; the checks that load no model always run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from loradrop.app.laplace_sweep import laplace_run_id, plan_laplace
from loradrop.app.runfolder import ADAPTER_DIR
from loradrop.cli import main
from loradrop.errors import UsageError

needs_laplace = pytest.mark.skipif(importlib.util.find_spec("laplace") is None,
                                   reason="laplace-torch is not installed (optional: pip install 'loradrop[laplace]')")
SEEDS = (0, 1)


def _direct(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from helpers import direct_calibration

    return direct_calibration(probs, labels)


def _table(md: str, heading: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    blocks = md[md.index(heading + "\n"):].split("\n\n")
    lines = next(b for b in blocks if b.startswith("|")).splitlines()
    split = lambda line: [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    return header, {cells[0]: dict(zip(header, cells)) for cells in map(split, lines[2:])}


def _stat(values: list[float], scale: float, digits: int) -> str:
    values = np.asarray(values, dtype=float) * scale
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def _plan(folder: Path, base: str, methods: str = "  lora: {no_lora_dropout: true}\n") -> Path:
    path = folder / "plan.yaml"
    path.write_text(f"name: lap\nresults: res\nbase: {{{base}}}\ngrid: {{task: [openbookqa], seed: {list(SEEDS)}}}\n"
                    f"methods:\n{methods}")
    return path


def test_refusals_and_missing_run_folders(tmp_path: Path, capsys) -> None:
    plan = _plan(tmp_path, "lr: 0.01", "  ld: {p: 0.5}\n")
    assert main(["sweep", str(plan), "--laplace"]) == 2
    assert "plan 'lap' has no method 'lora' (its methods: ['ld'])" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["sweep", str(plan), "--laplace", "mcmc"])
    assert exited.value.code == 2 and "invalid choice: 'mcmc' (choose from 'auto', 'val_nll', 'marglik')" in \
        capsys.readouterr().err
    with pytest.raises(UsageError, match="results folder .* does not exist"):
        plan_laplace(tmp_path / "nowhere")
    # a lora result whose run folder was not kept is reported, not scored; other methods and failures are ignored
    res = tmp_path / "res"
    res.mkdir()
    source = {"schema": "loradrop.sweep.run/1", "run_id": "openbookqa__lora__seed-3", "method": "lora",
              "status": "ok", "axes": {"task": "openbookqa", "seed": 3}, "settings": {}, "metrics": {}}
    (res / "openbookqa__lora__seed-3.json").write_text(json.dumps(source))
    (res / "openbookqa__ld__seed-3.json").write_text(json.dumps({**source, "method": "ld"}))
    (res / "x.failed.json").write_text(json.dumps({**source, "status": "failed"}))
    found = plan_laplace(res)
    assert (found.todo, found.done, found.missing) == ([], [], ["openbookqa__lora__seed-3"])
    assert laplace_run_id(source) == "openbookqa__laplace__seed-3"
    assert plan_laplace(res, only=["arc_easy__*"]).missing == []
    # with the run folder kept, it is to do; --dry-run lists it (the plan itself has two lora runs still to train)
    lora_plan = _plan(tmp_path, "lr: 0.01")
    kept = tmp_path / ".res.runs" / "openbookqa__lora__seed-3" / ADAPTER_DIR
    kept.mkdir(parents=True)
    (kept / "adapter_config.json").write_text("{}")
    assert [job.run_id for job in plan_laplace(res).todo] == ["openbookqa__laplace__seed-3"]
    assert main(["sweep", str(lora_plan), "--dry-run", "--laplace"]) == 0
    out = capsys.readouterr().out
    assert "openbookqa__laplace__seed-3\nlaplace: 1 to run, 0 done already, 0 without a kept run folder" in out
    assert "2 to run, 0 done already" in out


def _lora_result(task: str, lr: float, validation: float) -> dict:
    run_id = f"{task.replace('_', '-')}__lora__lr-{lr}_seed-0"  # as the sweep names it
    best = {"epoch": 3.0, "metric": "accuracy", "value": validation, "validation": {"single": {"accuracy": validation}}}
    return {"schema": "loradrop.sweep.run/1", "run_id": run_id, "method": "lora", "status": "ok",
            "axes": {"task": task, "lr": lr, "seed": 0}, "settings": {"task": task, "lr": lr, "seed": 0},
            "metrics": {"kind": "classification", "best_epoch": best,
                        "eval": {"single": {"accuracy": validation, "n": 10}, "ensemble": None}}}


def test_unfitted_runs_at_loras_choice_are_named(tmp_path: Path, capsys) -> None:
    """A LoRA run whose fit was lost with its machine is only worth training again where the report reads
    Laplace-LoRA: at LoRA's chosen rate, in a task whose LoRA grid is complete (else the choice may still move)."""
    from loradrop.app.laplace_sweep import unfitted_at_lora_choice

    res = tmp_path / "res"
    res.mkdir()
    for task, lr, validation in [("openbookqa", 1e-4, 0.3), ("openbookqa", 1e-3, 0.6), ("openbookqa", 3e-3, 0.5),
                                 ("arc_easy", 1e-4, 0.4)]:
        data = _lora_result(task, lr, validation)
        (res / f"{data['run_id']}.json").write_text(json.dumps(data))
    missing = plan_laplace(res).missing
    assert len(missing) == 4
    assert unfitted_at_lora_choice(res, missing) == ["arc-easy__lora__lr-0.0001_seed-0",
                                                     "openbookqa__lora__lr-0.001_seed-0"]
    assert unfitted_at_lora_choice(res, missing, {"arc_easy"}) == ["openbookqa__lora__lr-0.001_seed-0"]
    for spelling in ("ARC-Easy", "arceasy"):  # one task, as the registry reads names
        assert unfitted_at_lora_choice(res, missing, {spelling}) == ["openbookqa__lora__lr-0.001_seed-0"]
    # --dry-run names them; arc_easy has a LoRA run still to train (lr 1e-3), so its choice is not settled
    (tmp_path / "plan.yaml").write_text("name: lap\nresults: res\nbase: {epochs: 1}\n"
                                        "grid: {task: [openbookqa, arc_easy], lr: [0.0001, 0.001, 0.003], seed: [0]}\n"
                                        "methods:\n  lora: {no_lora_dropout: true}\n")
    assert main(["sweep", str(tmp_path / "plan.yaml"), "--dry-run", "--laplace"]) == 0
    out = capsys.readouterr().out
    assert "laplace: 1 of those at LoRA's chosen setting" in out and out.rstrip().endswith(
        "with their fits): openbookqa__lora__lr-0.001_seed-0")
    # --only narrows the runs looked at, not which grids are complete: arc_easy's 1e-3 and 3e-3 runs, outside the
    # glob, are still to train, so its current choice (1e-4, inside the glob) is not named
    assert main(["sweep", str(tmp_path / "plan.yaml"), "--dry-run", "--laplace", "--only", "*lr-0.0001*"]) == 0
    assert "of those at LoRA's chosen setting" not in capsys.readouterr().out


@needs_laplace
@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_sweep_laplace_feeds_the_report(data_root: Path, llama_dir: Path, tmp_path: Path, capsys, bf16: bool) -> None:
    """Two tiny plain-LoRA runs on an OpenBookQA slice with ARC-Easy as OOD set, then their Laplace results: MAP =
    the LoRA run's single pass (bf16 runs too: their MAP logits are taken under the autocast their run was scored
    with), Laplace metrics = what the written predictions give, the report's Laplace-LoRA row (in-distribution and
    OOD) = those numbers over the seeds, and a second invocation redoes nothing."""
    if not (data_root / "commonsense").is_dir():
        pytest.skip(f"no commonsense data in {data_root}")
    from loradrop.app.report import write_report

    plan = _plan(tmp_path, f"model: {llama_dir}, data_dir: {data_root}, max_train_samples: 16, max_eval_samples: 12, "
                           "holdout_fraction: 0.25, max_steps: 1, batch_size: 8, lr: 0.01, max_seq_len: 160, "
                           f"ood_task: [arc_easy], bf16: {str(bf16).lower()}")
    assert main(["sweep", str(plan), "--laplace"]) == 0
    # each Laplace fit ran in the sweep's worker right after its LoRA run, so the pass after the sweep finds them done
    assert "laplace lap: 0 ran, 2 done already, 0 failed, 0 without a kept run folder (of 2)" in capsys.readouterr().out
    res = tmp_path / "res"
    assert not list(tmp_path.glob(".res.runs/*"))  # no --keep-runs: the LoRA run folders went after their fits
    lap = {s: json.loads((res / f"openbookqa__laplace__seed-{s}.json").read_text()) for s in SEEDS}
    lora = {s: json.loads((res / f"openbookqa__lora__seed-{s}.json").read_text()) for s in SEEDS}
    accuracy, ood_accuracy = [], []
    for s in SEEDS:
        got, src = lap[s], lora[s]
        assert got["method"] == "laplace" and got["axes"] == src["axes"] and got["settings"] == src["settings"]
        assert got["source"]["run_id"] == src["run_id"] and got["metrics"]["laplace"]["prior_method"] == "val_nll"
        assert got["metrics"]["laplace"]["map_autocast"] == ("bfloat16 on cpu" if bf16 else None)
        assert got["wall_time_s"] > 0 and got["versions"] and got["hardware"]
        test = got["predictions"]["test"]
        # the MAP is the trained run's own single pass on the same test rows
        assert test["id"] == src["predictions"]["test"]["id"]
        np.testing.assert_allclose(test["single_probs"], src["predictions"]["test"]["single_probs"], atol=1e-5)
        assert got["metrics"]["eval"]["single"]["accuracy"] == src["metrics"]["eval"]["single"]["accuracy"]
        # the Laplace predictive's metrics are those of the written predictions, and differ from the MAP's
        direct = _direct(np.array(test["ensemble_probs"]), np.array(test["label"]))
        for k in ("accuracy", "ece", "nll", "brier"):
            assert got["metrics"]["eval"]["ensemble"][k] == pytest.approx(direct[k], abs=1e-5), k
        assert got["metrics"]["eval"]["ensemble"]["nll"] != got["metrics"]["eval"]["single"]["nll"]
        accuracy.append(direct["accuracy"])
        ood = got["predictions"]["ood_sets"]["arc_easy"]
        assert got["predictions"]["ood"] == ood and len(ood["label"]) == 12
        ood_accuracy.append(_direct(np.array(ood["ensemble_probs"]), np.array(ood["label"]))["accuracy"])
        part = got["metrics"]["uncertainty"]["ood_sets"][0]
        assert part["task"] == "arc_easy" and part["metrics"]["ensemble"]["accuracy"] == pytest.approx(ood_accuracy[-1])

    md = write_report([res], tmp_path / "R.md").read_text(encoding="utf-8")
    # the selection table: Laplace's lr is chosen by its LoRA run's validation score, as LoRA's was
    selection = md[md.index("| openbookqa | laplace"):].splitlines()[0]
    assert "no validation score" not in selection and "| lr 0.01: " in selection
    assert selection.split("|")[3] == md[md.index("| openbookqa | lora"):].splitlines()[0].split("|")[3]
    _, rows = _table(md, "### ACC (%)")
    assert rows["Laplace-LoRA"]["OBQA"] == _stat(accuracy, 100, 2)
    _, rows = _table(md, "#### ACC (%) on the OOD sets")
    assert rows["Laplace-LoRA"]["ARC-E"] == _stat(ood_accuracy, 100, 2)
    # the per-task table names both of its rows
    assert "| Laplace-LoRA, MAP (single pass) " in md and "| Laplace-LoRA (KFAC, GLM predictive) " in md

    stamps = {p: p.stat().st_mtime_ns for p in res.glob("*.json")}
    assert main(["sweep", str(plan), "--laplace"]) == 0
    assert "laplace lap: 0 ran, 2 done already" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in res.glob("*.json")} == stamps
