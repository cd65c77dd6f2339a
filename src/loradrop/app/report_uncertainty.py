"""The "Acting on uncertainty" section of ``loradrop report``: the ``uncertainty`` section that ``loradrop train``
writes into ``metrics.json`` with ``ood_task`` / ``conformal_alpha`` (`loradrop.app.acting`; a sweep result carries
the run's metrics), as mean ± std over the seeds of each task x method at its chosen setting (the rows of the
results tables).

Four tables per task, each left out when no run has its part: selective prediction (per score: accuracy of the
predictions it ranks, AURC, E-AURC, coverage at the single pass's accuracy and at 90% / 95% accuracy), OOD
detection (per OOD task and score: AUROC, AUPR with OOD positive and with in-distribution positive, FPR at 95% TPR),
OOD test sets (per OOD task whose evaluation predicts classes, e.g. OpenBookQA -> ARC-C / ARC-E / MMLU, and pass:
accuracy, ECE, NLL and the AUROC of that pass's max probability; ``ood_sets[*].metrics``) and conformal sets
(per alpha, calibration source, pass and method: coverage, mean set size, empty sets). Runs with different OOD
tasks, alphas or calibration sources are never averaged together. The section is absent when no run has an
``uncertainty`` section.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .plots import format_table
from .report_tables import Choice, Run, Stat, Study, dig, local_text

SCORES = ("single_max_prob", "ensemble_max_prob", "ensemble_entropy", "ensemble_mutual_information")
CONFORMAL_PASSES = ("single", "ensemble")
CONFORMAL_METHODS = ("lac", "aps")
COVERAGE_TARGETS = (("single_accuracy", "coverage @ single-pass acc. (%)"), ("0.9", "coverage @ 90% acc. (%)"),
                    ("0.95", "coverage @ 95% acc. (%)"))
SELECTIVE = (("accuracy", "accuracy (%)", 100.0, 2), ("aurc", "AURC", 1.0, 4), ("eaurc", "E-AURC", 1.0, 4))
OOD_TEST = (("accuracy", "accuracy (%)", 100.0, 2), ("ece", "ECE (%)", 100.0, 2), ("nll", "NLL", 1.0, 4))
OOD = (("auroc", "AUROC (%)", 100.0, 2), ("aupr_out", "AUPR-out (%)", 100.0, 2), ("aupr_in", "AUPR-in (%)", 100.0, 2),
       ("fpr_at_95_tpr", "FPR@95 (%)", 100.0, 2))
CONFORMAL = (("coverage", "coverage (%)", 100.0, 2), ("mean_set_size", "mean set size", 1.0, 3),
             ("empty_fraction", "empty sets (%)", 100.0, 2))

TEXT = (
    "From the `uncertainty` section of each run's metrics (`loradrop train --ood-task TASK --conformal-alpha A`, or "
    "`ood_task` / `conformal_alpha` in a sweep plan): mean ± std over the seeds at the setting chosen above (the "
    "seeds that have the section; n). Each score ranks the predictions it belongs to (the single pass's or the "
    "ensemble's); uncertainty is 1 − max p, the entropy or the mutual information. AURC / E-AURC: area under the "
    "risk-coverage curve (0/1 loss) and its excess over the oracle ranking, lower is better; coverage @ accuracy: "
    "the largest share of the test examples answered, most certain first, at that accuracy. OOD: the OOD task's "
    "evaluation split scored by the same model, OOD as the positive class. OOD test sets (one training run scored "
    "on several test sets: `ood_task: arc_challenge,arc_easy,...`): each OOD set's own accuracy, ECE (15 bins) and "
    "NLL of the single pass and of the ensemble, and the AUROC of that pass's 1 − max p against the in-distribution "
    "test split. Conformal: LAC and APS sets at "
    "miscoverage alpha (target coverage 1 − alpha), calibrated on the run's validation split (`validation`) or on a "
    "seeded half of the test split and tested on the other half (`eval_half`).")


def _section(run: Run) -> dict[str, Any]:
    value = run.metrics.get("uncertainty")
    return value if isinstance(value, dict) else {}


def _stat_cells(parts: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, float, int]],
                get: Callable[[dict[str, Any], str], Any] = lambda part, key: part.get(key)) -> dict[str, str]:
    return {title: Stat.of(get(p, key) for p in parts).fmt(scale, digits) for key, title, scale, digits in columns}


def _groups(runs: Sequence[Run], part: str, key: Callable[[dict[str, Any]], Any]) -> list[tuple[Any, list]]:
    """The runs' `part` sections grouped by `key` (e.g. the OOD task), groups in sorted order."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        value = _section(run).get(part)
        if isinstance(value, dict):
            groups.setdefault(key(value), []).append(value)
    return sorted(groups.items(), key=lambda kv: str(kv[0]))


def _ood_groups(runs: Sequence[Run]) -> list[tuple[Any, list]]:
    """Each OOD set's part of the runs (``ood_sets``, or the single ``ood`` of older results), grouped by task."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        section = _section(run)
        parts = section.get("ood_sets") if isinstance(section.get("ood_sets"), list) else [section.get("ood")]
        for part in parts:
            if isinstance(part, dict):
                groups.setdefault(part.get("task"), []).append(part)
    return sorted(groups.items(), key=lambda kv: str(kv[0]))


def _base(choice: Choice) -> dict[str, str]:
    return {"method": choice.method, "lr": f"{choice.lr:g}", "setting": local_text(choice.local) or "–"}


def _score_names(parts: Sequence[dict[str, Any]]) -> list[str]:
    found = {name for p in parts for name in (p.get("scores") or {})}
    return [s for s in SCORES if s in found] + sorted(found - set(SCORES))


def selective_rows(choice: Choice) -> list[dict[str, str]]:
    rows = []
    for _, parts in _groups(choice.runs, "selective", lambda _: ""):
        for score in _score_names(parts):
            per_run = [p["scores"][score] for p in parts if score in (p.get("scores") or {})]
            cells = {**_base(choice), "score": score, **_stat_cells(per_run, SELECTIVE)}
            cells.update({title: Stat.of(dig(r, "coverage_at_accuracy", target, "coverage") for r in per_run)
                          .fmt(100.0, 2) for target, title in COVERAGE_TARGETS})
            rows.append({**cells, "n": str(len(per_run))})
    return rows


def ood_rows(choice: Choice) -> list[dict[str, str]]:
    rows = []
    for task, parts in _ood_groups(choice.runs):
        for score in _score_names(parts):
            per_run = [p["scores"][score] for p in parts if score in (p.get("scores") or {})]
            rows.append({**_base(choice), "OOD task": str(task), "score": score, **_stat_cells(per_run, OOD),
                         "n": str(len(per_run))})
    return rows


def ood_test_rows(choice: Choice) -> list[dict[str, str]]:
    """Per OOD set with metrics (a task that predicts classes) and pass: mean ± std over seeds of its accuracy,
    ECE, NLL and the detection AUROC of that pass's max probability."""
    rows = []
    for task, parts in _ood_groups(choice.runs):
        for pass_ in CONFORMAL_PASSES:
            per_run = [p for p in parts if isinstance(dig(p, "metrics", pass_), dict)]
            if per_run:
                cells = _stat_cells([p["metrics"][pass_] for p in per_run], OOD_TEST)
                auroc = Stat.of(dig(p, "scores", f"{pass_}_max_prob", "auroc") for p in per_run).fmt(100.0, 2)
                rows.append({**_base(choice), "OOD task": str(task), "pass": pass_, **cells,
                             "AUROC 1−max p (%)": auroc, "n": str(len(per_run))})
    return rows


def conformal_rows(choice: Choice) -> list[dict[str, str]]:
    rows = []
    key = lambda part: (part.get("alpha"), dig(part, "calibration", "source"))  # noqa: E731
    for (alpha, source), parts in _groups(choice.runs, "conformal", key):
        for pass_ in CONFORMAL_PASSES:
            for method in CONFORMAL_METHODS:
                per_run = [p[pass_][method] for p in parts if isinstance(dig(p, pass_, method), dict)]
                if per_run:
                    rows.append({**_base(choice), "alpha": f"{alpha:g}" if isinstance(alpha, (int, float)) else
                                 str(alpha), "calibration": str(source), "pass": pass_, "sets": method.upper(),
                                 **_stat_cells(per_run, CONFORMAL), "n": str(len(per_run))})
    return rows


TABLES = (
    ("Selective prediction", selective_rows,
     ["method", "lr", "setting", "score", *(t for _, t, _, _ in SELECTIVE), *(t for _, t in COVERAGE_TARGETS), "n"]),
    ("OOD detection", ood_rows, ["method", "lr", "setting", "OOD task", "score", *(t for _, t, _, _ in OOD), "n"]),
    ("OOD test sets", ood_test_rows, ["method", "lr", "setting", "OOD task", "pass",
                                      *(t for _, t, _, _ in OOD_TEST), "AUROC 1−max p (%)", "n"]),
    ("Conformal sets", conformal_rows,
     ["method", "lr", "setting", "alpha", "calibration", "pass", "sets", *(t for _, t, _, _ in CONFORMAL), "n"]),
)


def uncertainty_report(study: Study) -> list[str]:
    """The report's "Acting on uncertainty" section (Markdown lines); empty when no run has an uncertainty
    section."""
    if not any(_section(run) for run in study.runs):
        return []
    out = ["## Acting on uncertainty", "", TEXT, ""]
    for task in study.tasks:
        choices = [c for m in study.methods(task, side=None) for c in study.choices[(task, m)]]
        for title, build, columns in TABLES:
            rows = [row for c in choices for row in build(c)]
            if rows:
                clean = [{k: v.replace("|", "\\|") for k, v in row.items()} for row in rows]
                out += [f"### {title} on {task}", "", format_table(clean, columns, markdown=True), ""]
    return out


__all__ = ["uncertainty_report"]
