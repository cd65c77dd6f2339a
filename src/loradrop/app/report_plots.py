"""The PNG plots of ``loradrop report``, from the runs at the chosen settings: reliability diagrams, ECE over
training, train vs validation loss per epoch, the `ld_sens` sensitivity curves and the `ld_strategy` bar chart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .plots import plot_bars, plot_lines, plot_reliability
from .report_claims import sensitivity_values
from .report_tables import FORMATS, Stat, Study, arrays, dig, local_text, number, prob_key

RELIABILITY = (("LoRA", "lora", "single"), ("LoRA Dropout (train only)", "ld_paper", "single"),
               ("LoRA Dropout (train + test)", "ld_paper", "ensemble"), ("MC dropout", "lora_peft_dropout", "ensemble"))
STRATEGY_ORDER = ("ab", "a", "b", "rank", "input")
Figures = dict[str, list[tuple[str, Path]]]


def make_plots(study: Study, folder: Path) -> Figures:
    """Writes every plot the runs allow into `folder`; returns ``{section: [(caption, path), ...]}``."""
    figures: Figures = {"reliability": [], "ece": [], "loss": [], "sensitivity": [], "strategies": []}
    for task in study.tasks:
        for section, plot in (("reliability", _reliability), ("ece", _ece_over_training), ("loss", _loss_gap),
                              ("sensitivity", _sensitivity), ("strategies", _strategies)):
            made = plot(study, task, folder)
            if made is not None:
                figures[section].append(made)
    return figures


def _reliability(study: Study, task: str, folder: Path) -> tuple[str, Path] | None:
    import torch

    if study.info[task].regression:
        return None
    curves = {}
    for name, method, pass_ in RELIABILITY:
        row = study.row(task, method, pass_)
        found = [a for r in (row.choice.runs if row else []) if (a := arrays(r, "test", prob_key(pass_, False)))]
        if found:  # pooled over the seeds at the chosen setting
            curves[name] = (torch.as_tensor(np.concatenate([f[0] for f in found])),
                            torch.as_tensor(np.concatenate([f[1] for f in found]).astype(np.int64)))
    if not curves:
        return None
    path = plot_reliability(curves, folder / f"{task}_reliability.png",
                            title=f"{task}: reliability on test (15 bins, seeds pooled)")
    return f"{task}: reliability diagram (test predictions of all seeds at the chosen setting, pooled)", path


def _epoch_frame(study: Study, task: str, methods: list[str]) -> pd.DataFrame:
    """One row per (method, seed, epoch): train loss, validation NLL and test ECE of the single pass."""
    records = []
    for method in methods:
        row = study.row(task, method, "single")
        for run in row.choice.runs if row else []:
            for e in run.metrics.get("epochs") or []:
                val = dig(e, "validation", "single") or {}  # span tasks: span_nll, the QA training loss's quantity
                records.append({"method": method, "name": row.name, "seed": run.seed, "epoch": number(e.get("epoch")),
                                "train_loss": number(e.get("train_loss")),
                                "validation_nll": number(val.get("nll", val.get("span_nll"))),
                                "test_ece": number(dig(e, "test", "single", "ece"))})
    return pd.DataFrame.from_records(records, columns=["method", "name", "seed", "epoch", "train_loss",
                                                       "validation_nll", "test_ece"])


def _ece_over_training(study: Study, task: str, folder: Path) -> tuple[str, Path] | None:
    if study.info[task].regression:
        return None
    frame = _epoch_frame(study, task, study.methods(task)).dropna(subset=["test_ece"])
    if frame.empty:
        return None
    series = {}
    for name, group in frame.groupby("name", sort=False):
        mean = group.groupby("epoch")["test_ece"].mean()
        series[str(name)] = {"x": mean.index.tolist(), "y": (mean * FORMATS["ece"][0]).tolist()}
    path = plot_lines(series, folder / f"{task}_ece_over_training.png", xlabel="epoch", ylabel="test ECE (%)",
                      title=f"{task}: ECE of the single pass over training (mean over seeds)")
    return f"{task}: test ECE (single pass) after each epoch, mean over seeds", path


def _loss_gap(study: Study, task: str, folder: Path) -> tuple[str, Path] | None:
    if study.info[task].regression:
        return None
    frame = _epoch_frame(study, task, [m for m in ("lora", "ld_paper") if m in study.methods(task)])
    if frame.empty:
        return None
    series = {}
    for i, (name, group) in enumerate(frame.groupby("name", sort=False)):
        mean = group.groupby("epoch")[["train_loss", "validation_nll"]].mean()
        for column, label, style in (("train_loss", "train loss", "-o"), ("validation_nll", "validation NLL", "--s")):
            values = mean[column].dropna()
            if len(values):
                series[f"{name}: {label}"] = {"x": values.index.tolist(), "y": values.tolist(), "style": style,
                                              "color": f"C{i}"}
    if not series:
        return None
    path = plot_lines(series, folder / f"{task}_loss_gap.png", xlabel="epoch", ylabel="loss",
                      title=f"{task}: train loss vs validation NLL (mean over seeds)")
    return f"{task}: mean train loss of each epoch vs validation NLL after it (single pass), mean over seeds", path


def _sensitivity(study: Study, task: str, folder: Path) -> tuple[str, Path] | None:
    grid, pass_ = sensitivity_values(study, task)
    if not grid:
        return None
    series = {}
    for samples in sorted({k[1] for k in grid}, key=str):
        cells = sorted(((k[0], Stat.of(v.values())) for k, v in grid.items() if k[1] == samples), key=lambda c: c[0])
        series[f"N = {samples}"] = {"x": [c[0] for c in cells], "y": [c[1].mean * 100 for c in cells],
                                    "yerr": [c[1].std * 100 for c in cells]}
    main = study.info[task].main
    path = plot_lines(series, folder / f"{task}_sensitivity.png", xlabel="p", ylabel=f"test {main} (x100)",
                      title=f"{task}: ld_sens, {pass_} pass (mean ± std over seeds)")
    return f"{task}: sensitivity to p and N (ld_sens, {pass_} pass, error bars: std over seeds)", path


def _strategies(study: Study, task: str, folder: Path) -> tuple[str, Path] | None:
    choices = study.choices.get((task, "ld_strategy"), [])
    if not choices:
        return None
    order = {s: i for i, s in enumerate(STRATEGY_ORDER)}

    def label(choice) -> str:
        local = dict(choice.local)
        return str(local["strategy"]) if set(local) == {"strategy"} else local_text(choice.local) or "default"

    choices = sorted(choices, key=lambda c: (order.get(label(c), len(order)), label(c)))
    main = study.info[task].main
    bars = {}
    for pass_, name in (("single", "single pass"), ("ensemble", "ensemble")):
        stats = [Stat.of(dig(r.metrics, "eval", pass_, main) for r in c.runs) for c in choices]
        if any(s.n for s in stats):
            bars[name] = ([s.mean * 100 for s in stats], [s.std * 100 for s in stats])
    if not bars:
        return None
    path = plot_bars([label(c) for c in choices], bars, folder / f"{task}_strategies.png",
                     ylabel=f"test {main} (x100)", title=f"{task}: ld_strategy (mean ± std)")
    return f"{task}: masking strategies (ld_strategy), error bars: std over seeds", path


__all__ = ["make_plots"]
