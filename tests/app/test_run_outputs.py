"""What every run leaves and shows: summary.md, plots next to metrics.json (loss curves, reliability diagram with
ECE and bin counts, uncertainty histogram), one rounded console table for train and eval, data caveats."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loradrop.app.outputs import data_caveats, metrics_table, settings_line
from loradrop.cli import main


def test_metrics_table_is_rounded_and_has_both_predictors() -> None:
    table = metrics_table({"accuracy": 0.123456789, "ece": 0.0123456, "n": 16},
                          {"accuracy": 0.5, "ece": 0.25, "n": 16, "ensemble_size": 8})
    lines = table.splitlines()
    assert lines[0].split() == ["predictor", "accuracy", "ece", "n"]
    assert lines[2].split() == ["single", "pass", "0.1235", "0.0123", "16"]
    assert lines[3].split() == ["ensemble", "of", "8", "0.5000", "0.2500", "16"]
    assert not re.search(r"\d\.\d{5,}", table)


def test_data_caveats_come_from_the_metadata() -> None:
    metadata = {"note": "CoLA-tokenized: lowercased", "derived_splits": "train/validation split by article",
                "rows": {"train": 32, "validation": 277}, "rows_before_subsampling": {"train": 2490, "validation": 277},
                "source": "hub:nyu-mll/glue"}
    assert data_caveats(metadata) == ["CoLA-tokenized: lowercased", "splits: train/validation split by article",
                                      "subsampled: train 32 of 2490", "data from the hub (nyu-mll/glue)"]
    assert data_caveats({"rows": {"train": 3}, "rows_before_subsampling": {"train": 3}}) == []
    assert settings_line({"command": "train", "task": "rte", "p": 0.5, "resume": False, "model": None}) == (
        "task=rte p=0.5")


@pytest.mark.slow
def test_train_and_eval_write_plots_summary_and_print_one_table(data_root, bert_dir: Path, tmp_path: Path,
                                                                capsys) -> None:
    output = tmp_path / "run"
    assert main(["train", "--task", "rte", "--model", str(bert_dir), "--max-train-samples", "32",
                 "--max-eval-samples", "24", "--max-steps", "4", "--eval-steps", "2", "--batch-size", "8",
                 "--max-seq-len", "48", "--ensemble", "3", "--samples", "2", "--lr", "1e-2",
                 "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "data caveat: subsampled: train 32 of" in out
    table = out[out.index("rte, validation split:"):].splitlines()
    assert table[1].split()[:5] == ["predictor", "accuracy", "ece", "nll", "brier"]
    assert table[3].startswith("single pass") and table[4].startswith("ensemble of 3")
    assert not re.search(r"\d\.\d{5,}", "\n".join(table[:5]))  # rounded
    for name in ("summary.md", "loss_curves.png", "reliability.png", "uncertainty.png", "metrics.json"):
        assert (output / name).is_file(), name
        assert (output / name).stat().st_size > 0
    summary = (output / "summary.md").read_text()
    assert "Settings: `task=rte output=" in summary and "samples=2" in summary
    assert "- subsampled: train 32 of" in summary and "| single pass" in summary and "| ensemble of 3" in summary
    assert "![reliability](reliability.png)" in summary and "![loss_curves](loss_curves.png)" in summary

    assert main(["eval", "--adapter", str(output), "--ensemble", "4"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out  # no raw JSON
    assert out.count("data caveat: subsampled: validation 24 of") == 1  # printed once, before the table
    assert out.index("data caveat:") < out.index("rte, validation split:")
    table = out[out.index("rte, validation split:"):].splitlines()
    assert table[3].startswith("single pass") and table[4].startswith("ensemble of 4")
    for name in ("eval_summary.md", "eval_reliability.png", "eval_uncertainty.png", "eval_metrics.json"):
        assert (output / name).is_file(), name
    assert (output / "reliability.png").is_file()  # the training run's plot is kept


def test_loss_plot_labels_what_each_curve_is(tmp_path: Path, monkeypatch) -> None:
    from loradrop.app import outputs

    seen = {}
    monkeypatch.setattr(outputs, "plot_lines", lambda series, path, **kw: seen.update(series=series, **kw))
    history = {"train": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}], "eval": [{"step": 2, "loss": 0.65}]}
    assert outputs.write_loss_plot(tmp_path, history, masked=True) == ["loss_curves.png"]
    assert list(seen["series"]) == ["training loss: mean over the masked members",
                                    "evaluation loss: expected update, no masks"]
    outputs.write_loss_plot(tmp_path, history, masked=False)
    assert list(seen["series"]) == ["training loss", "evaluation loss: eval mode"]
