"""The ``uncertainty`` section of ``eval_metrics.json`` and of ``metrics.json`` (issue #15; ``loradrop eval`` and
``loradrop train`` with ``--ood-task`` / ``--conformal-alpha``): selective prediction, OOD detection and
split-conformal sets, computed from the written prediction rows with `loradrop.uncertainty` and
`loradrop.conformal`, and its plots (risk-coverage, OOD score histogram).

``ood_task`` may name several OOD sets (comma-separated): each is scored by the same model once and gets its own
entry in ``ood_sets`` (``ood`` is the first one, where single-set readers look), its own prediction rows and plot.
An OOD task whose evaluation predicts classes (commonsense letter scoring: ARC, MMLU subjects...) is scored by its
own ``evaluate``, so its entry also holds its accuracy, ECE, NLL and Brier (``metrics``: single pass and ensemble);
a classification OOD task's labels are not the run's classes, so it gets the detection view only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..conformal import ConformalClassifier, split_conformal, split_indices
from ..uncertainty import (
    coverage_at_accuracy,
    ood_detection,
    plot_risk_coverage,
    selective_prediction,
    uncertainty_score,
)

RISK_COVERAGE_PLOT = "risk_coverage.png"  # eval writes them with the prefix "eval_"
OOD_PLOT = "ood_scores.png"
OOD_PREDICTIONS = "ood_predictions.jsonl"
CONFORMAL_METHODS = ("lac", "aps")
ACCURACY_TARGETS = (0.9, 0.95)


def row_scores(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Uncertainty per example (higher = less sure) of each score the rows carry: ``single_max_prob`` (1 - max p of
    the single pass) and, for an ensemble, ``ensemble_max_prob``, ``ensemble_entropy``, ``ensemble_mutual_information``
    (the values written in the rows' ``uncertainty``)."""
    def probs(key: str) -> torch.Tensor:  # float64: the written values exactly (ties decide the curves)
        return torch.tensor([r[key] for r in rows], dtype=torch.float64)

    scores = {"single_max_prob": uncertainty_score(probs("single_probs"), "max_prob")}
    if rows and "ensemble_probs" in rows[0]:
        scores["ensemble_max_prob"] = uncertainty_score(probs("ensemble_probs"), "max_prob")
        scores["ensemble_entropy"] = torch.tensor([r["uncertainty"]["entropy"] for r in rows], dtype=torch.float64)
        scores["ensemble_mutual_information"] = torch.tensor(
            [r["uncertainty"]["mutual_information"] for r in rows], dtype=torch.float64)
    return scores


def _correct(rows: Sequence[dict[str, Any]], score: str) -> torch.Tensor:
    key = "single_pred" if score.startswith("single") else "ensemble_pred"
    return torch.tensor([r[key] == r["label"] for r in rows])


def selective_section(rows: Sequence[dict[str, Any]], folder: Path | None = None, *,
                      prefix: str = "eval_") -> dict[str, Any]:
    """AURC, E-AURC and coverage at the single pass's accuracy (and at 0.9 / 0.95) per score; each score ranks the
    predictions it belongs to (the single pass's or the ensemble's). Writes the risk-coverage plot to `folder`."""
    single_accuracy = float(_correct(rows, "single").double().mean())
    out: dict[str, Any] = {"single_accuracy": single_accuracy, "scores": {}}
    curves = {}
    for name, score in row_scores(rows).items():
        correct = _correct(rows, name)
        curve = selective_prediction(score, correct=correct)
        curves[name] = curve
        targets = {"single_accuracy": single_accuracy, **{str(t): t for t in ACCURACY_TARGETS}}
        coverage = {}
        for label, target in targets.items():
            cov, threshold = coverage_at_accuracy(score, correct, target)
            coverage[label] = {"target": target, "coverage": cov, "threshold": threshold}
        out["scores"][name] = {"aurc": curve.aurc, "eaurc": curve.eaurc, "aurc_optimal": curve.aurc_optimal,
                               "accuracy": float(correct.double().mean()), "coverage_at_accuracy": coverage}
    if folder is not None:
        plot_risk_coverage(curves, folder / f"{prefix}{RISK_COVERAGE_PLOT}", title="risk-coverage (0/1 loss)")
        out["plot"] = f"{prefix}{RISK_COVERAGE_PLOT}"
    return out


def ood_file(name: str, task: str, index: int, prefix: str = "") -> str:
    """The file of the `index`-th OOD set: `name` itself for the first (``ood_predictions.jsonl``), else with the
    task inserted (``ood_predictions_arc_easy.jsonl``)."""
    stem, dot, ext = name.rpartition(".")
    return f"{prefix}{name}" if index == 0 else f"{prefix}{stem}_{task}{dot}{ext}"


def ood_section(rows: Sequence[dict[str, Any]], ood_rows: Sequence[dict[str, Any]], *, task: str,
                folder: Path | None = None, prefix: str = "eval_", index: int = 0) -> dict[str, Any]:
    """AUROC / AUPR / FPR@95 per score, the OOD task's examples the positives; writes the histogram plot (of the
    `index`-th OOD set: `ood_file`)."""
    ins, outs = row_scores(rows), row_scores(ood_rows)
    out: dict[str, Any] = {"task": task, "scores": {name: ood_detection(ins[name], outs[name]) for name in ins}}
    if folder is not None:
        plot = ood_file(OOD_PLOT, task, index, prefix)
        plot_ood_histograms(ins, outs, folder / plot, ood_task=task)
        out["plot"] = plot
    return out


def conformal_section(rows: Sequence[dict[str, Any]], alpha: float, *, seed: int,
                      calibration_rows: Sequence[dict[str, Any]] | None = None,
                      calibration_split: str | None = None) -> dict[str, Any]:
    """Coverage and mean set size of LAC and APS sets at `alpha`, for the single pass and the ensemble: calibrated on
    `calibration_rows` (the run's validation split) and tested on all `rows`, or, without them, calibrated on a
    seeded random half of `rows` (`loradrop.conformal.split_indices(n, 0.5, seed)`) and tested on the other half."""
    labels = torch.tensor([r["label"] for r in rows])
    sources = {"single": "single_probs"}
    if rows and "ensemble_probs" in rows[0]:
        sources["ensemble"] = "ensemble_probs"
    if calibration_rows is not None:
        calibration = {"source": "validation", "split": calibration_split, "n_calibration": len(calibration_rows),
                       "n_test": len(rows), "description": f"calibrated on the run's {calibration_split} split, "
                                                           "tested on the whole evaluation split"}
    else:
        cal, test = split_indices(len(rows), 0.5, seed)
        calibration = {"source": "eval_half", "seed": seed, "n_calibration": len(cal), "n_test": len(test),
                       "description": "calibrated on a seeded random half of the evaluation split "
                                      "(loradrop.conformal.split_indices(n, 0.5, seed)), tested on the other half"}
    out: dict[str, Any] = {"alpha": alpha, "calibration": calibration}
    for name, key in sources.items():
        probs = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        out[name] = {}
        for method in CONFORMAL_METHODS:
            if calibration_rows is None:
                out[name][method] = split_conformal(probs, labels, alpha=alpha, method=method, seed=seed)
            else:
                cal_probs = torch.tensor([r[key] for r in calibration_rows], dtype=torch.float64)
                cal_labels = torch.tensor([r["label"] for r in calibration_rows])
                fitted = ConformalClassifier(alpha=alpha, method=method, seed=seed).fit(cal_probs, cal_labels)
                out[name][method] = {"method": method, **fitted.evaluate(probs, labels)}
    return out


def ood_names(ood_task: str | None) -> list[str]:
    """The OOD tasks of an ``ood_task`` setting (comma-separated); empty without one."""
    return [name.strip() for name in ood_task.split(",")] if ood_task else []


def prepare_ood(ood_task: str | None, data_dir: str | None, tokenizer: Any, *, max_seq_len: int, seed: int,
                max_eval_samples: int | None, choice_scoring: str | None = None) -> list[Any] | None:
    """Each OOD task's evaluation split, tokenized for the run's model (None without `ood_task`); prepared before
    any model is loaded, so missing OOD data stops a run before it trains. Multiple-choice OOD sets are scored as
    the run's task is (`choice_scoring`)."""
    if ood_task is None:
        return None
    from ..tasks import prepare_task, resolve_task
    from ..tasks.cloze_scoring import with_choice_scoring

    def spec_of(name: str) -> Any:
        spec = resolve_task(name, data_dir)
        return with_choice_scoring(spec, choice_scoring) if spec.family == "commonsense" else spec

    return [prepare_task(spec_of(name), data_dir, tokenizer, max_seq_len=max_seq_len, seed=seed,
                         max_eval_samples=max_eval_samples, need_train=False) for name in ood_names(ood_task)]


def score_ood(model: Any, data: Any, *, batch_size: int, ensemble: int, chunk_size: int | None, seed: int,
              mc_dropout: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(prediction rows, metrics or None) of one OOD set: a task that predicts classes through its own scorer
    (`TaskSpec.predicts_classes`: letters of multiple-choice questions, whose labels are answers the run's model
    can get right) is scored by its ``evaluate`` (rows and ``{"single", "ensemble"}`` metrics); a classification
    task by the run's classifier (`ood_rows`, no metrics)."""
    if data.spec.predicts_classes:
        result = data.spec.evaluate(model, data, None, batch_size=batch_size, ensemble=ensemble,
                                    chunk_size=chunk_size, seed=seed, mc_dropout=mc_dropout, progress=False)
        return result.rows, {"single": result.single, "ensemble": result.ensemble}
    return ood_rows(model, data, batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size, seed=seed,
                    mc_dropout=mc_dropout), None


def ood_rows(model: Any, data: Any, *, batch_size: int, ensemble: int, chunk_size: int | None, seed: int,
             mc_dropout: bool = False) -> list[dict[str, Any]]:
    """Prediction rows of the OOD task's evaluation split, scored by the in-distribution model (its labels are the
    OOD task's own and are not compared with the model's classes)."""
    from ..ensemble import entropy
    from ..prediction import predict_classification

    preds = predict_classification(model, data.extras["encoded"][data.eval_split], data.collator,
                                   batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size, seed=seed,
                                   mc_dropout=mc_dropout)
    rows = []
    for i in range(len(preds.single)):
        row: dict[str, Any] = {"index": i, "single_probs": [float(v) for v in preds.single[i].double()]}
        if preds.ensemble is not None:
            row.update(ensemble_probs=[float(v) for v in preds.ensemble[i].double()],
                       uncertainty={"entropy": float(entropy(preds.ensemble[i].double())),
                                    "mutual_information": float(preds.mutual_information[i])})
        rows.append(row)
    return rows


def uncertainty_section(model: Any, rows: list[dict[str, Any]], folder: Path, *, ood_data: list[Any] | None = None,
                        ood_task: str | None = None, alpha: float | None = None,
                        calibration_rows: list[dict[str, Any]] | None = None, batch_size: int, ensemble: int,
                        chunk_size: int | None, seed: int, mc_dropout: bool = False,
                        prefix: str = "eval_", score: Any = None) -> dict[str, Any]:
    """The whole ``uncertainty`` section of a run: selective prediction always; OOD detection (and, for OOD tasks
    that predict classes, their metrics) for each of `ood_data` (`prepare_ood` of `ood_task`; rows written to
    ``<prefix>ood_predictions[_<task>].jsonl`` in `folder`: `ood_file`); conformal sets at `alpha`, calibrated on
    `calibration_rows` (the run's validation split) when given, else on a seeded half of `rows`. `score`, when
    given, scores an OOD set in place of `score_ood` (``data -> (rows, metrics)``: the Laplace-LoRA predictive)."""
    from .runfolder import write_jsonl

    section: dict[str, Any] = {"selective": selective_section(rows, folder, prefix=prefix)}
    if ood_data:
        sets = []
        for index, (task, data) in enumerate(zip(ood_names(ood_task), ood_data, strict=True)):
            scored, metrics = score(data) if score is not None else score_ood(
                model, data, batch_size=batch_size, ensemble=ensemble, chunk_size=chunk_size, seed=seed,
                mc_dropout=mc_dropout)
            predictions = ood_file(OOD_PREDICTIONS, task, index, prefix)
            write_jsonl(folder / predictions, scored)
            sets.append({**ood_section(rows, scored, task=task, folder=folder, prefix=prefix, index=index),
                         "eval_split": data.eval_split, "predictions": predictions,
                         **({"metrics": metrics} if metrics is not None else {})})
        section["ood"], section["ood_sets"] = sets[0], sets
    if alpha is not None:
        calibration_rows = calibration_rows or None  # no validation rows: the seeded half of `rows`
        section["conformal"] = conformal_section(rows, alpha, seed=seed, calibration_rows=calibration_rows,
                                                 calibration_split="validation" if calibration_rows else None)
    return section


def plot_ood_histograms(ins: dict[str, torch.Tensor], outs: dict[str, torch.Tensor], path: Path, *,
                        ood_task: str) -> Path:
    """One histogram per score: in-distribution against the OOD task's examples."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(ins)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    try:
        for ax, name in zip(axes[0], names, strict=True):
            values = torch.cat([ins[name], outs[name]])
            lo, hi = float(values.min()), float(values.max())
            bins = torch.linspace(lo, hi if hi > lo else lo + 1e-6, 21).numpy()
            ax.hist(ins[name].numpy(), bins=bins, alpha=0.6, label=f"in-distribution ({len(ins[name])})")
            ax.hist(outs[name].numpy(), bins=bins, alpha=0.6, label=f"OOD: {ood_task} ({len(outs[name])})")
            ax.set_title(name.replace("_", " "), fontsize=9)
            ax.set_xlabel("uncertainty")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("examples")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
