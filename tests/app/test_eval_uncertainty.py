"""``loradrop eval --ood-task --conformal-alpha`` (issue #15): the ``uncertainty`` section of eval_metrics.json equals
`loradrop.uncertainty` / `loradrop.conformal` applied to the written predictions, and its plots exist."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loradrop.cli import main
from loradrop.conformal import ConformalClassifier, split_conformal
from loradrop.uncertainty import coverage_at_accuracy, ood_detection, selective_prediction, uncertainty_score

pytestmark = pytest.mark.slow

ALPHA = 0.2


def train_args(bert_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--task", "rte", "--model", str(bert_dir), "--max-train-samples", "32", "--max-eval-samples",
            "24", "--max-steps", "2", "--batch-size", "8", "--max-seq-len", "32", "--ensemble", "2",
            "--output", str(output), *extra]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def column(rows_: list[dict], *keys: str) -> torch.Tensor:
    values = []
    for r in rows_:
        for key in keys:
            r = r[key]
        values.append(r)
    return torch.tensor(values, dtype=torch.float64)  # the written values exactly (ties decide the curves)


def scores(rows_: list[dict]) -> dict[str, torch.Tensor]:
    return {"single_max_prob": uncertainty_score(column(rows_, "single_probs"), "max_prob"),
            "ensemble_max_prob": uncertainty_score(column(rows_, "ensemble_probs"), "max_prob"),
            "ensemble_entropy": column(rows_, "uncertainty", "entropy"),
            "ensemble_mutual_information": column(rows_, "uncertainty", "mutual_information")}


@pytest.fixture(scope="module")
def run_dir(data_root: Path, bert_dir: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "rte"
    assert main(train_args(bert_dir, output)) == 0
    return output


@pytest.fixture(scope="module")
def evaluated(run_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--adapter", str(run_dir), "--ensemble", "4", "--ood-task", "mrpc",
                 "--conformal-alpha", str(ALPHA), "--output", str(out)]) == 0
    return out


def test_selective_prediction_equals_the_library(evaluated: Path) -> None:
    metrics = json.loads((evaluated / "eval_metrics.json").read_text())
    section = metrics["uncertainty"]["selective"]
    preds = rows(evaluated / "eval_predictions.jsonl")
    single_correct = torch.tensor([r["single_pred"] == r["label"] for r in preds])
    ens_correct = torch.tensor([r["ensemble_pred"] == r["label"] for r in preds])
    assert section["single_accuracy"] == pytest.approx(float(single_correct.double().mean()))
    assert section["single_accuracy"] == pytest.approx(metrics["eval"]["single"]["accuracy"])
    assert set(section["scores"]) == {"single_max_prob", "ensemble_max_prob", "ensemble_entropy",
                                      "ensemble_mutual_information"}
    for name, score in scores(preds).items():
        correct = single_correct if name.startswith("single") else ens_correct
        got = section["scores"][name]
        curve = selective_prediction(score, correct=correct)
        assert got["aurc"] == pytest.approx(curve.aurc, abs=1e-6)
        assert got["eaurc"] == pytest.approx(curve.eaurc, abs=1e-6)
        assert 0 <= got["aurc_optimal"] <= got["aurc"] <= 1 and got["eaurc"] >= -1e-12
        target = got["coverage_at_accuracy"]["single_accuracy"]
        assert target["target"] == pytest.approx(section["single_accuracy"])
        assert target["coverage"] == pytest.approx(coverage_at_accuracy(score, correct, target["target"])[0],
                                                   abs=1e-6)
        assert 0 <= target["coverage"] <= 1
    assert (evaluated / section["plot"]).stat().st_size > 0


def test_ood_detection_equals_the_library(evaluated: Path) -> None:
    section = json.loads((evaluated / "eval_metrics.json").read_text())["uncertainty"]["ood"]
    assert section["task"] == "mrpc"
    ins, outs = scores(rows(evaluated / "eval_predictions.jsonl")), scores(rows(evaluated / section["predictions"]))
    assert len(outs["single_max_prob"]) == 24  # --max-eval-samples of the run applies to the OOD set too
    for name in ins:
        got, want = section["scores"][name], ood_detection(ins[name], outs[name])
        for key in ("auroc", "aupr_out", "aupr_in", "fpr_at_95_tpr"):
            assert 0 <= got[key] <= 1
            assert got[key] == pytest.approx(want[key], abs=1e-6)
        assert got["n_in"] == got["n_out"] == 24
    assert (evaluated / section["plot"]).stat().st_size > 0


def test_conformal_sets_equal_the_library(evaluated: Path) -> None:
    section = json.loads((evaluated / "eval_metrics.json").read_text())["uncertainty"]["conformal"]
    preds = rows(evaluated / "eval_predictions.jsonl")
    assert section["alpha"] == ALPHA
    assert section["calibration"]["source"] == "eval_half"  # the run carved no validation split
    assert section["calibration"]["n_calibration"] + section["calibration"]["n_test"] == len(preds)
    labels = torch.tensor([r["label"] for r in preds])
    for name, key in (("single", "single_probs"), ("ensemble", "ensemble_probs")):
        probs = torch.tensor([r[key] for r in preds], dtype=torch.float64)
        for method in ("lac", "aps"):
            got = section[name][method]
            want = split_conformal(probs, labels, alpha=ALPHA, method=method, seed=section["calibration"]["seed"])
            for k in ("coverage", "mean_set_size", "qhat", "n_calibration", "n_test"):
                assert got[k] == pytest.approx(want[k]), (name, method, k)
            assert 0 <= got["coverage"] <= 1 and 0 <= got["mean_set_size"] <= 2


def test_conformal_calibrates_on_the_runs_validation_split(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "rte-holdout"
    assert main(train_args(bert_dir, run, "--holdout-fraction", "0.5")) == 0
    assert main(["eval", "--adapter", str(run), "--ensemble", "2", "--conformal-alpha", str(ALPHA)]) == 0
    metrics = json.loads((run / "eval_metrics.json").read_text())
    section = metrics["uncertainty"]["conformal"]
    assert section["calibration"]["source"] == "validation"
    cal, test = rows(run / section["calibration"]["predictions"]), rows(run / "eval_predictions.jsonl")
    assert section["calibration"]["n_calibration"] == len(cal) == 16 and section["calibration"]["n_test"] == len(test)
    for method in ("lac", "aps"):
        fitted = ConformalClassifier(alpha=ALPHA, method=method, seed=metrics["seed"]).fit(
            column(cal, "ensemble_probs"), torch.tensor([r["label"] for r in cal]))
        want = fitted.evaluate(column(test, "ensemble_probs"),
                               torch.tensor([r["label"] for r in test]))
        assert section["ensemble"][method]["coverage"] == pytest.approx(want["coverage"])
        assert section["ensemble"][method]["mean_set_size"] == pytest.approx(want["mean_set_size"])
    assert "ood" not in metrics["uncertainty"] and not math.isnan(section["single"]["lac"]["coverage"])


@pytest.mark.parametrize("flags, message", [
    (["--ood-task", "stsb"], "got 'stsb'"),
    (["--ood-task", "nosuchtask"], "each one of ['arc_challenge', 'arc_easy', 'boolq', 'cola'"),
    (["--conformal-alpha", "1.5"], "conformal_alpha must be a number in (0, 1)"),
])
def test_bad_flags_are_one_line(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["eval", "--adapter", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loradrop eval: error:") and message in err[0], err


def test_train_writes_the_same_uncertainty_section(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    """``loradrop train --ood-task --conformal-alpha``: metrics.json gets the section eval writes, computed from the
    run's own predictions; the conformal sets are calibrated on its held-out validation split."""
    run = tmp_path / "rte-act"
    assert main(train_args(bert_dir, run, "--holdout-fraction", "0.5", "--ood-task", "mrpc",
                           "--conformal-alpha", str(ALPHA))) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    section = metrics["uncertainty"]
    preds, cal = rows(run / "predictions.jsonl"), rows(run / "validation_predictions.jsonl")
    ood = rows(run / section["ood"]["predictions"])
    assert section["ood"]["predictions"] == "ood_predictions.jsonl" and section["ood"]["task"] == "mrpc"
    assert len(ood) == 24 and len(cal) == 16
    ens_correct = torch.tensor([r["ensemble_pred"] == r["label"] for r in preds])
    ins, outs = scores(preds), scores(ood)
    for name in ins:
        assert section["ood"]["scores"][name]["auroc"] == pytest.approx(ood_detection(ins[name], outs[name])["auroc"])
    mi = selective_prediction(ins["ensemble_mutual_information"], correct=ens_correct)
    assert section["selective"]["scores"]["ensemble_mutual_information"]["aurc"] == pytest.approx(mi.aurc, abs=1e-6)
    conformal = section["conformal"]
    assert conformal["calibration"]["source"] == "validation" and conformal["calibration"]["n_calibration"] == 16
    labels = torch.tensor([r["label"] for r in preds])
    for method in ("lac", "aps"):
        fitted = ConformalClassifier(alpha=ALPHA, method=method, seed=metrics["seed"]).fit(
            column(cal, "ensemble_probs"), torch.tensor([r["label"] for r in cal]))
        want = fitted.evaluate(column(preds, "ensemble_probs"), labels)
        assert conformal["ensemble"][method]["coverage"] == pytest.approx(want["coverage"])
        assert conformal["ensemble"][method]["mean_set_size"] == pytest.approx(want["mean_set_size"])
    for part in ("selective", "ood"):  # train's plots carry no eval_ prefix
        assert not section[part]["plot"].startswith("eval_") and (run / section[part]["plot"]).stat().st_size > 0
    assert metrics["config"]["args"]["ood_task"] == "mrpc" and metrics["config"]["args"]["conformal_alpha"] == ALPHA


def test_train_refuses_acting_on_a_regression_task(tmp_path: Path, capsys) -> None:
    assert main(["train", "--task", "stsb", "--output", str(tmp_path / "x"), "--conformal-alpha", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loradrop train: error:"), err
    assert "conformal_alpha need a task that predicts classes; 'stsb' is a regression task" in err[0]
    assert not (tmp_path / "x").exists()


def test_eval_moves_the_model_to_the_eval_device(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`loradrop eval` runs the model on `eval_device()` (the GPU when there is one; the CPU here), not where it was
    loaded: the model is moved there before anything is scored. cpu:0 stands in for the GPU, so the move is seen."""
    from loradrop.app import eval_run

    assert eval_run.eval_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_run.eval_device() == torch.device("cuda")
    monkeypatch.undo()
    stand_in = torch.device("cpu", 0)
    monkeypatch.setattr(eval_run, "eval_device", lambda: stand_in)
    moved, original = [], torch.nn.Module.to

    def to(self, *args, **kwargs):
        if stand_in in args or kwargs.get("device") == stand_in:
            moved.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    assert main(["eval", "--adapter", str(run_dir), "--output", str(tmp_path / "eval")]) == 0
    assert moved  # the PEFT model, once
