"""Tables and plots: comparison tables (text/Markdown), reliability diagrams, loss curves, line plots with error
bars and grouped bar charts as PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str], *, markdown: bool = False) -> str:
    """A fixed-width (or Markdown) table; floats are shown with 4 decimals."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    grid = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in grid)]) for i, c in enumerate(columns)]  # grid may be empty
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in grid]
    else:
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in grid]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path,
                     n_bins: int = 15, title: str | None = None, *, counts: bool = True) -> Path:
    """Reliability diagram (accuracy vs confidence per bin) of several predictors on one axis, each labelled with its
    ECE (same bins); with `counts`, a panel below shows how many examples fall in each bin."""
    from ..calibration import reliability_diagram

    plt = _pyplot()
    if counts:
        fig, (ax, bins_ax) = plt.subplots(2, 1, figsize=(5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    width = 1.0 / n_bins / max(1, len(curves))
    for i, (name, (probs, labels)) in enumerate(curves.items()):
        d = reliability_diagram(probs, labels, n_bins)
        total = sum(d.count) or 1
        ece = sum(n / total * abs(a - c) for c, a, n in zip(d.confidence, d.accuracy, d.count) if n)
        pts = [(c, a) for c, a, n in zip(d.confidence, d.accuracy, d.count) if n]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, color=f"C{i}", label=f"{name} (ECE {ece:.4f})")
        if counts:
            lefts = [lo + i * width for lo in d.edges[:-1]]
            bins_ax.bar(lefts, d.count, width=width, align="edge", color=f"C{i}", label=name)
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title or f"Reliability diagram ({n_bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    if counts:
        bins_ax.set(xlabel="confidence (top label)", ylabel="examples per bin", xlim=(0, 1))
    else:
        ax.set(xlabel="confidence (top label)")
    return _save(fig, path)


def plot_histogram(series: Mapping[str, Sequence[float]], path: str | Path, *, xlabel: str, title: str,
                   bins: int = 30) -> Path:
    """Overlaid histograms of one or more value lists (e.g. the ensemble's per-example mutual information)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, values) in enumerate(series.items()):
        ax.hist(list(values), bins=bins, alpha=0.6, color=f"C{i}", label=name)
    ax.set(xlabel=xlabel, ylabel="examples", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_curves(histories: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]], path: str | Path) -> Path:
    """Train (solid) and eval (dashed) loss against the optimizer step, one colour per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, history) in enumerate(histories.items()):
        color = f"C{i}"
        train = history.get("train", [])
        if train:
            ax.plot([p["step"] for p in train], [p["loss"] for p in train], "-", color=color, label=f"{name} train")
        evaluation = history.get("eval", [])
        if evaluation:
            ax.plot([p["step"] for p in evaluation], [p["loss"] for p in evaluation], "--o", ms=3, color=color,
                    label=f"{name} eval")
    ax.set(xlabel="optimizer step", ylabel="loss", title="Loss curves")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_lines(series: Mapping[str, Mapping[str, Any]], path: str | Path, *, xlabel: str, ylabel: str,
               title: str) -> Path:
    """One line per series ``{"x": [...], "y": [...]}`` with optional ``"yerr"`` (error bars), ``"style"`` (a
    matplotlib format, default ``"-o"``) and ``"color"``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, s) in enumerate(series.items()):
        yerr = s.get("yerr")
        if yerr is not None:
            yerr = [0.0 if e is None or e != e else e for e in yerr]  # no bar where the spread is unknown (n < 2)
        ax.errorbar(s["x"], s["y"], yerr=yerr, fmt=s.get("style", "-o"), ms=3, capsize=3 if yerr else 0,
                    color=s.get("color", f"C{i}"), label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(categories: Sequence[str], bars: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
              path: str | Path, *, ylabel: str, title: str) -> Path:
    """Grouped bars: for each name in `bars` one bar per category, with optional error bars (``(heights, errors)``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(categories) + 2), 4))
    width = 0.8 / max(1, len(bars))
    for i, (name, (heights, errors)) in enumerate(bars.items()):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(categories))]
        errs = None if errors is None else [0.0 if e is None or e != e else e for e in errors]
        ax.bar(xs, [h if h == h else 0.0 for h in heights], width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(range(len(categories)), list(categories))
    ax.set(ylabel=ylabel, title=title)
    finite = [h for _, (heights, _) in bars.items() for h in heights if h == h]
    if finite:  # zoom on the differences: bars of similar scores would otherwise look identical
        low, high = min(finite), max(finite)
        span = (high - low) or abs(high) * 0.05 or 1.0
        ax.set_ylim(low - 1.5 * span, high + span)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    tmp.replace(path)
    return path
