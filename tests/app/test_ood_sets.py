"""One training run scored on several OOD test sets (#14: OpenBookQA -> ARC-C / ARC-E / MMLU without retraining):
``ood_task`` as a list, each letter-scored OOD set with its own accuracy / ECE / NLL / Brier (single pass and
ensemble) and the detection view against the in-distribution test split, carried by the sweep result, reported
as the "OOD test sets" table, and ``loradrop eval --ood-task`` on the same adapter. A tiny random Llama with
SmolLM2's tokenizer on real slices (numbers checked against a direct computation, sklearn for AUROC)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loradrop.app.settings import EvalSettings, TrainSettings, ood_task_choices
from loradrop.cli import main
from loradrop.errors import SettingsError

OOD = ["arc_challenge", "mmlu_college_physics"]


def test_ood_task_list_and_its_validation(tmp_path: Path, capsys) -> None:
    settings = TrainSettings(task="openbookqa", output=str(tmp_path / "x"), ood_task=OOD)
    assert settings.ood_task == "arc_challenge,mmlu_college_physics"  # a list is stored comma-separated
    assert EvalSettings(adapter="a", ood_task="arc_easy, piqa").ood_task == "arc_easy, piqa"
    allowed = ood_task_choices("openbookqa")
    assert {"arc_easy", "mmlu_college_chemistry"} <= set(allowed) and "openbookqa" not in allowed
    assert "sst2" not in allowed and "arc_easy" not in ood_task_choices("sst2")
    refused = r"each one of \['arc_challenge', 'arc_easy', 'boolq'.*got 'arc_easy,sst2' \('sst2' not allowed\)"
    with pytest.raises(SettingsError, match=refused):
        TrainSettings(task="openbookqa", output="x", ood_task="arc_easy,sst2")
    with pytest.raises(SettingsError, match="names a task twice"):
        TrainSettings(task="openbookqa", output="x", ood_task="arc_easy,arc_easy")
    assert main(["train", "--task", "openbookqa", "--output", str(tmp_path / "y"), "--ood-task", "arc_easy,mrpc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ood_task must be one or more comma-separated" in err[0]
    assert "'mmlu_college_physics'" in err[0] and "('mrpc' not allowed)" in err[0]
    assert not (tmp_path / "y").exists()


@pytest.fixture(scope="module")
def cs_root(data_root: Path) -> Path:
    if not (data_root / "commonsense").is_dir() or not (data_root / "mmlu" / "data" / "test").is_dir():
        pytest.skip(f"no commonsense or MMLU data in {data_root}")
    return data_root




def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _direct_metrics(rows: list[dict], key: str) -> dict[str, float]:
    """Accuracy, top-label ECE (15 equal-width bins, right-closed as torchmetrics), NLL and Brier from the rows."""
    from helpers import direct_calibration

    return direct_calibration([r[key] for r in rows], [r["label"] for r in rows])


@pytest.mark.slow
def test_one_run_scored_on_two_ood_sets(cs_root: Path, llama_dir: Path, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from loradrop.app.report import write_report
    from loradrop.app.sweep import SweepPlan, run_sweep

    (tmp_path / "plan.yaml").write_text(
        f"name: ood\nresults: res\nbase: {{model: {llama_dir}, data_dir: {cs_root}, max_train_samples: 24, "
        "max_eval_samples: 12, holdout_fraction: 0.25, max_steps: 2, batch_size: 6, ensemble: 3, lr: 0.01, "
        f"ood_task: [{', '.join(OOD)}]}}\ngrid: {{task: [openbookqa], seed: [0]}}\n"
        "methods:\n  ld: {p: 0.5, samples: 2}\n")
    summary = run_sweep(SweepPlan.load(tmp_path / "plan.yaml"), progress=False, keep_runs=True)
    assert summary["ok"] == 1, summary
    result = json.loads(next((tmp_path / "res").glob("openbookqa__ld*.json")).read_text())
    section = result["metrics"]["uncertainty"]
    sets = section["ood_sets"]
    assert [s["task"] for s in sets] == OOD and section["ood"] == sets[0]
    run = next((tmp_path / ".res.runs").iterdir())
    ins = _rows(run / "predictions.jsonl")
    assert len(ins) == 12 and result["metrics"]["eval_split"] == "test"
    for part in sets:
        rows = _rows(run / part["predictions"])
        assert len(rows) == 12 and part["eval_split"] == "validation"
        assert len(rows[0]["single_probs"]) == (5 if part["task"] == "arc_challenge" else 4)
        for pass_, key in (("single", "single_probs"), ("ensemble", "ensemble_probs")):
            got, want = part["metrics"][pass_], _direct_metrics(rows, key)
            assert got["n"] == 12
            for name, value in want.items():
                assert got[name] == pytest.approx(value, abs=1e-5), (part["task"], pass_, name)
        y = [0] * len(ins) + [1] * len(rows)
        for score, values in (("single_max_prob", lambda r: 1 - max(r["single_probs"])),
                              ("ensemble_max_prob", lambda r: 1 - max(r["ensemble_probs"])),
                              ("ensemble_mutual_information", lambda r: r["uncertainty"]["mutual_information"])):
            auroc = roc_auc_score(y, [values(r) for r in ins + rows])
            assert part["scores"][score]["auroc"] == pytest.approx(auroc, abs=1e-6), (part["task"], score)
        assert (run / part["plot"]).stat().st_size > 0
        carried = result["predictions"]["ood_sets"][part["task"]]  # the sweep result carries every set's rows
        assert carried["label"] == [r["label"] for r in rows] and len(carried["ensemble_probs"]) == 12
    assert sets[1]["predictions"] == "ood_predictions_mmlu_college_physics.jsonl"

    md = write_report([tmp_path / "res"], tmp_path / "R.md").read_text(encoding="utf-8")
    table = md[md.index("### OOD test sets on openbookqa"):].split("\n\n")[1].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = {(c[header.index("OOD task")], c[header.index("pass")]): c for c in
             ([x.strip() for x in line.strip("|").split("|")] for line in table[2:])}
    assert set(cells) == {(t, p) for t in OOD for p in ("single", "ensemble")}
    for part in sets:
        row = cells[(part["task"], "ensemble")]
        assert row[header.index("accuracy (%)")] == f"{part['metrics']['ensemble']['accuracy'] * 100:.2f}"
        assert row[header.index("ECE (%)")] == f"{part['metrics']['ensemble']['ece'] * 100:.2f}"
        assert row[header.index("NLL")] == f"{part['metrics']['ensemble']['nll']:.4f}"
        auroc = part["scores"]["ensemble_max_prob"]["auroc"]
        assert row[header.index("AUROC 1−max p (%)")] == f"{auroc * 100:.2f}" and row[header.index("n")] == "1"

    # `loradrop eval --ood-task` on the same adapter: a third OOD set, scored in full
    assert main(["eval", "--adapter", str(run), "--ensemble", "2", "--ood-task", "arc_easy",
                 "--output", str(tmp_path / "ev")]) == 0
    evaluated = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())["uncertainty"]["ood"]
    assert evaluated["task"] == "arc_easy" and evaluated["metrics"]["ensemble"]["ensemble_size"] == 2
    assert evaluated["metrics"]["single"]["n"] == 12  # the run's max_eval_samples
    assert main(["eval", "--adapter", str(run), "--ood-task", "sst2"]) == 2  # not scored by a letter scorer
