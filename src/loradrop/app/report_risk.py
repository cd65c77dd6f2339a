"""Risk-coverage view of the commonsense section of ``loradrop report`` (#14, selective prediction): accuracy vs
coverage when abstaining on the most uncertain test examples first, by 1 − max p, the entropy of the predictive and
the ensemble's mutual information, for every row of the published layout (`report_commonsense.ROWS`) that has
per-example predictions; AURC (`loradrop.uncertainty.selective_prediction`) per run, mean ± std over seeds (the deep
ensemble: one), and one PNG per task with the curves of the runs' test predictions pooled over seeds.

Mutual information needs members: it is read from the ensemble rows' predictions (``uncertainty.mutual_information``,
written by the run from its M members) and computed from the seeds for the deep ensemble; single-pass rows have
none ("–").
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..uncertainty import selective_prediction, uncertainty_score
from .plots import _pyplot, _save, format_table
from .report_tables import Stat, Study, apply_temperature, arrays, fit_temperature, prob_key

RISK_SCORES = (("max_prob", "1 − max p"), ("entropy", "entropy"), ("mutual_information", "mutual information"))

def aligned_mean(parts: Sequence[tuple[np.ndarray, np.ndarray, list]]) -> tuple[np.ndarray, np.ndarray] | None:
    """Members' probabilities on the examples all of them scored, stacked (k, n, C), and the labels; None when
    they scored different examples (a test set drawn per seed: no fair ensemble)."""
    if len(parts) < 2:
        return None
    ids = [p[2] or list(range(len(p[1]))) for p in parts]
    if any(set(i) != set(ids[0]) for i in ids[1:]):
        return None
    stacked = []
    for (probs, _, _), own in zip(parts, ids):
        position = {x: n for n, x in enumerate(own)}
        stacked.append(probs[[position[x] for x in ids[0]]])
    return np.stack(stacked), parts[0][1]


# one run's test predictions: probabilities (n, C), labels (n,), mutual information (n,) or None
Predictions = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@functools.cache  # the plot and the AURC table ask again (cleared by `report_commonsense.commonsense_report`)
def row_predictions(study: Study, task: str, row) -> list[Predictions]:
    """The test predictions of a `report_commonsense.MethodRow` on `task`, one entry per seed (the deep ensemble:
    one entry, its mutual information computed from the seeds)."""
    choices = study.choices.get((task, row.method), [])
    if len(choices) != 1:
        return []
    runs = choices[0].runs
    if row.derived == "deep":
        found = [a for r in runs if (a := arrays(r, "test", prob_key("single", False))) is not None]
        stacked = aligned_mean(found)
        if stacked is None:
            return []
        members, labels = stacked
        mean = members.mean(0)
        mi = uncertainty_score(torch.as_tensor(mean), "mutual_information", member_probs=torch.as_tensor(members))
        return [(mean, labels, mi.numpy())]
    out = []
    for run in runs:
        test = arrays(run, "test", prob_key(row.pass_, False))
        if test is None:
            continue
        probs, labels = test[0], test[1]
        if row.derived == "ts":
            validation = arrays(run, "validation", prob_key("single", False))
            if validation is None:
                continue
            probs = apply_temperature(probs, fit_temperature(validation[0], validation[1]))
        mi = None
        if row.pass_ == "ensemble":
            values = ((run.predictions("test") or {}).get("uncertainty") or {}).get("mutual_information")
            mi = np.asarray(values, dtype=np.float64) if values is not None and len(values) == len(labels) else None
        out.append((probs, labels, mi))
    return out


def uncertainty_of(pred: Predictions, score: str) -> np.ndarray | None:
    probs, _, mi = pred
    if score == "mutual_information":
        return mi
    return uncertainty_score(torch.as_tensor(probs), score).numpy()


def curve_of(preds: Sequence[Predictions], score: str):
    """The risk-coverage curve of `preds` pooled (concatenated), or None when a prediction lacks the score."""
    scores = [uncertainty_of(p, score) for p in preds]
    if not preds or any(s is None for s in scores):
        return None
    correct = np.concatenate([p[0].argmax(1) == p[1] for p in preds])
    return selective_prediction(np.concatenate(scores), correct=correct)


def aurc_stat(preds: Sequence[Predictions], score: str) -> Stat:
    """AURC of each seed's predictions, over seeds."""
    return Stat.of(c.aurc for p in preds if (c := curve_of([p], score)) is not None)


def _plot(task: str, curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(RISK_SCORES), figsize=(5 * len(RISK_SCORES), 4), sharey=True)
    for ax, (score, title) in zip(axes, RISK_SCORES):
        for i, (label, per_score) in enumerate(curves.items()):
            if score in per_score:
                coverage, accuracy = per_score[score]
                ax.plot(coverage, accuracy * 100, "-", color=f"C{i % 10}", label=label, lw=1.2)
        ax.set(xlabel="coverage (answered share, most certain first)", title=f"abstain by {title}", xlim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy of the answered (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task}: risk-coverage on test (seeds pooled)")
    return _save(fig, path)


def risk_section(study: Study, cols: Sequence[tuple[str, str]], rows: Sequence[tuple[str, Any]], plots: Path,
                 base: Path) -> list[str]:
    """The AURC table (rows = method x score, columns = the (task, label) `cols`) and one risk-coverage PNG per
    task; `rows` are (label, `report_commonsense.MethodRow`)."""
    table, images = [], []
    for task, _ in cols:
        curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for label, row in rows:
            preds = row_predictions(study, task, row)
            for score, _ in RISK_SCORES:
                curve = curve_of(preds, score)
                if curve is not None:
                    curves.setdefault(label, {})[score] = (curve.coverage.numpy(),
                                                                           curve.accuracy.numpy())
        if curves:
            path = _plot(task, curves, plots / f"{task}_risk_coverage.png")
            images.append((task, Path(os.path.relpath(path, base)).as_posix()))
    for label_, row in rows:
        for score, title in RISK_SCORES:
            stats = {label: aurc_stat(row_predictions(study, task, row), score) for task, label in cols}
            if any(s.n for s in stats.values()):
                table.append({"method": label_, "abstain by": title,
                              **{label: s.fmt(100.0, 2) if s.n else "–" for label, s in stats.items()}})
    if not table:
        return []
    clean = [{k: v.replace("|", "\\|") for k, v in r.items()} for r in table]
    out = ["### Selective prediction: risk-coverage", "",
           "Abstain on the most uncertain test examples first (1 − max p, entropy, or the ensemble's mutual "
           "information) and score the answered ones. AURC: area under the risk-coverage curve (0/1 risk; "
           "`loradrop.uncertainty.selective_prediction`), x100, lower is better; mean ± std of each seed's AURC "
           "(the deep ensemble: one). Single-pass rows have no mutual information.", "",
           format_table(clean, ["method", "abstain by", *(label for _, label in cols)], markdown=True), ""]
    for task, rel in images:
        caption = f"{task}: accuracy vs coverage per method and score (test predictions of the seeds pooled)"
        out += [f"![{caption}]({rel})  \n*{caption}*", ""]
    return out


__all__ = ["risk_section", "row_predictions"]
