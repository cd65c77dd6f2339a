"""The commonsense (LLM) section of ``loradrop report`` (#14), in the layout of the published tables (BLoB,
Laplace-LoRA, BAG): rows = methods, column groups = the letter-scored tasks (WG-S, ARC-C, ARC-E, WG-M, OBQA, BoolQ,
then PIQA and any other present), one table each for accuracy, ECE (x100, 15 bins) and NLL, mean ± std over seeds
at the setting the selection protocol chose; the OOD tables (trained on OBQA, scored on ARC-C / ARC-E / MMLU
chemistry / physics through ``ood_task``); the published Llama-3.1-8B ECEs of issue #14 next to ours with orderings
computed from both; a risk-coverage view (`report_risk`); and a cost summary per method.

Derived rows come from the per-example predictions: temperature scaling (one T per `lora` run, fitted on its
validation predictions; `report_tables.temperature_row`), the deep ensemble (the `lora` seeds' test probabilities
averaged; `report_tables.deep_ensemble`). Laplace-LoRA appears when results of a method named ``laplace`` exist
(its ``ensemble`` pass is the Laplace predictive, as `loradrop eval --laplace` writes it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .plots import format_table
from .report_risk import aligned_mean, risk_section, row_predictions
from .report_tables import (
    Stat,
    Study,
    apply_temperature,
    arrays,
    calibration,
    deep_ensemble,
    dig,
    fit_temperature,
    number,
    temperature_row,
)

# (task, column label) in the published tables' order; PIQA and other commonsense tasks follow when present
TASK_COLUMNS = (("winogrande_s", "WG-S"), ("arc_challenge", "ARC-C"), ("arc_easy", "ARC-E"),
                ("winogrande_m", "WG-M"), ("openbookqa", "OBQA"), ("boolq", "BoolQ"))
OPTIONAL_COLUMNS = (("piqa", "PIQA"),)
OOD_COLUMNS = (("arc_challenge", "ARC-C"), ("arc_easy", "ARC-E"), ("mmlu_college_chemistry", "Chem"),
               ("mmlu_college_physics", "Phys"))
# metric -> (title, scale, digits, higher is better)
METRICS = {"accuracy": ("ACC (%)", 100.0, 2, True), "ece": ("ECE (%, 15 bins)", 100.0, 2, False),
           "nll": ("NLL", 1.0, 3, False), "auroc": ("Detection AUROC of 1 − max p (%)", 100.0, 2, True)}
# The published ECEs (x100) on Llama-3.1-8B as quoted in issue #14 (WG-S, ARC-C, ARC-E, WG-M, OBQA, BoolQ):
# another model, reported in shape only.
PUBLISHED_MODEL = "Llama-3.1-8B"
PUBLISHED_ECE = {"MLE": (17.0, 16.4, 7.0, 13.8, 9.8, 8.7), "MC dropout": (16.1, 13.7, 6.7, 13.1, 9.8, 8.0),
                 "BLoB": (8.8, 5.9, 4.2, 3.4, 3.4, 2.5), "DALorRA": (7.8, 5.6, 2.9, 3.3, 3.1, 1.8)}


@dataclass(frozen=True)
class MethodRow:
    """A row of the published layout: a method's pass, or a row derived from the `lora` runs' predictions."""

    label: str
    method: str
    pass_: str
    derived: str = ""  # "" | "ts" (temperature scaling) | "deep" (deep ensemble of the seeds)


ROWS = (MethodRow("MLE LoRA", "lora", "single"), MethodRow("MC dropout", "lora_peft_dropout", "ensemble"),
        MethodRow("Deep ensemble (LoRA seeds)", "lora", "single", "deep"),
        MethodRow("Temperature scaling (LoRA)", "lora", "single", "ts"),
        MethodRow("LoRA Dropout single pass", "ld_paper", "single"),
        MethodRow("LoRA Dropout ensemble", "ld_paper", "ensemble"),
        MethodRow("LoRA Dropout 1x single pass", "ld_1x", "single"),
        MethodRow("LoRA Dropout 1x ensemble", "ld_1x", "ensemble"),
        MethodRow("Laplace-LoRA", "laplace", "ensemble"))
MLE = ROWS[0]
PUBLISHED_OURS = {"MLE": MLE, "MC dropout": ROWS[1]}  # the published rows that we also run


def commonsense_tasks(study: Study) -> list[str]:
    """The study's letter-scored commonsense tasks (the registry catalog's family), in column order."""
    from ..tasks import CATALOG

    found = [t for t in study.tasks if getattr(CATALOG.get(t), "family", None) == "commonsense"]
    known = [t for t, _ in TASK_COLUMNS + OPTIONAL_COLUMNS]
    return [t for t in known if t in found] + sorted(set(found) - set(known))


def columns(study: Study) -> list[tuple[str, str]]:
    """The published six (shown as "–" when not run), then PIQA and any other commonsense task present."""
    present = set(commonsense_tasks(study))
    known = {t for t, _ in TASK_COLUMNS}
    extra = [(t, label) for t, label in OPTIONAL_COLUMNS if t in present]
    extra += [(t, t) for t in commonsense_tasks(study) if t not in known and t not in dict(OPTIONAL_COLUMNS)]
    return list(TASK_COLUMNS) + extra


def ensemble_size(study: Study, method: str) -> str:
    sizes = sorted({int(v) for r in study.runs if r.method == method
                    if isinstance(v := dig(r.metrics, "config", "ensemble"), (int, float)) and v > 1})
    return "/".join(map(str, sizes))


def deep_ensemble_sizes(study: Study, tasks: Iterable[str]) -> list[int]:
    """How many LoRA seeds the deep ensembles of `tasks` average: only those formed (`deep_ensemble`; a task with one
    seed, or seeds tested on different examples, forms none)."""
    return sorted({e.k for t in tasks if (e := deep_ensemble(study, t)) is not None and e.skipped is None})


def row_label(study: Study, row: MethodRow) -> str:
    if row.pass_ == "ensemble" and row.method != "laplace" and (m := ensemble_size(study, row.method)):
        return f"{row.label} (M={m})"
    if row.derived == "deep":
        k = deep_ensemble_sizes(study, study.tasks)
        return f"Deep ensemble (k={'/'.join(map(str, k))} LoRA seeds)" if k else row.label
    return row.label


@functools.cache  # every table of the section asks again (cleared by `commonsense_report`)
def id_values(study: Study, task: str, row: MethodRow) -> dict[str, Stat] | None:
    """Accuracy, ECE and NLL over seeds of one row on one task (None when not run)."""
    if task not in study.tasks:
        return None
    if row.derived == "deep":
        ens = deep_ensemble(study, task)
        if ens is None or ens.skipped is not None:
            return None
        return {k: Stat.of([ens.values[k]]) for k in ("accuracy", "ece", "nll")}
    base = study.row(task, row.method, row.pass_)
    if base is None:
        return None
    if row.derived == "ts":
        scaled = temperature_row(base)
        return None if scaled is None else {k: scaled.values[k] for k in ("accuracy", "ece", "nll")}
    return {"accuracy": base.values["main"], "ece": base.values["ece"], "nll": base.values["nll"]}


def _cell(stat: Stat | None, metric: str) -> str:
    _, scale, digits, _ = METRICS[metric]
    return "–" if stat is None or not stat.n else stat.fmt(scale, digits)


def _bold_best(rows: list[dict[str, str]], stats: dict[tuple[int, str], Stat], keys: Sequence[str],
               metric: str) -> None:
    """Bold each column's best mean (ties: all of them)."""
    higher = METRICS[metric][3]
    for key in keys:
        means = {i: s.mean for (i, k), s in stats.items() if k == key and s.n}
        if len(means) >= 2:
            best = (max if higher else min)(means.values())
            for i, m in means.items():
                if m == best:
                    rows[i][key] = f"**{rows[i][key]}**"


def _table(rows: list[dict[str, str]], cols: list[str]) -> str:
    return format_table([{k: v.replace("|", "\\|") for k, v in r.items()} for r in rows], cols, markdown=True)


def layout_table(study: Study, metric: str, cols: Sequence[tuple[str, str]],
                 values: Callable[[str, MethodRow], dict[str, Stat] | None]) -> str:
    """Rows = methods with at least one value, columns = `cols`; cells mean ± std over seeds, "–" when missing."""
    rows, stats = [], {}
    for row in ROWS:
        cells, found = {"method": row_label(study, row)}, False
        for task, label in cols:
            got = values(task, row)
            stat = got.get(metric) if got else None
            found |= bool(stat is not None and stat.n)
            cells[label] = _cell(stat, metric)
            if stat is not None and stat.n:
                stats[(len(rows), label)] = stat
        if found:
            rows.append(cells)
    _bold_best(rows, stats, [label for _, label in cols], metric)
    return _table(rows, ["method", *(label for _, label in cols)]) if rows else ""


# --------------------------------------------------------------------------------------------------------- OOD
def ood_sources(study: Study) -> list[str]:
    """Commonsense tasks whose runs were scored on OOD sets (``uncertainty.ood_sets``): OpenBookQA in the plans."""
    return [t for t in commonsense_tasks(study)
            if any(r.task == t and dig(r.metrics, "uncertainty", "ood_sets") for r in study.runs)]


def _ood_probs(run: Any, task: str, key: str) -> tuple[np.ndarray, np.ndarray, list] | None:
    sets = run.predictions("ood_sets") or {}
    rows = sets.get(task) or {}
    if rows.get(key) is None or rows.get("label") is None:
        return None
    return np.asarray(rows[key], dtype=np.float64), np.asarray(rows["label"]), list(rows.get("id") or [])


def auroc(in_probs: np.ndarray, out_probs: np.ndarray) -> float:
    """OOD-detection AUROC of 1 − max p, OOD positive (scikit-learn's roc_auc_score)."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([1 - in_probs.max(1), 1 - out_probs.max(1)])
    return float(roc_auc_score(np.r_[np.zeros(len(in_probs)), np.ones(len(out_probs))], scores))


@functools.cache
def ood_values(study: Study, source: str, task: str, row: MethodRow) -> dict[str, Stat] | None:
    """Accuracy, ECE, NLL and detection AUROC on OOD set `task` of the row's `source` runs, over seeds."""
    choices = study.choices.get((source, row.method), [])
    if len(choices) != 1:
        return None
    runs = choices[0].runs
    if row.derived == "deep":
        members = [(r, _ood_probs(r, task, "single_probs"), arrays(r, "test", "single_probs")) for r in runs]
        members = [m for m in members if m[1] is not None and m[2] is not None]
        ood, ind = aligned_mean([m[1] for m in members]), aligned_mean([m[2] for m in members])
        if ood is None or ind is None:
            return None
        mean = ood[0].mean(0)
        values = {**calibration(mean, ood[1]), "auroc": auroc(ind[0].mean(0), mean)}
        return {k: Stat.of([values[k]]) for k in ("accuracy", "ece", "nll", "auroc")}
    per_run = []
    for run in runs:
        if row.derived == "ts":
            val, test = arrays(run, "validation", "single_probs"), arrays(run, "test", "single_probs")
            out = _ood_probs(run, task, "single_probs")
            if val is None or test is None or out is None:
                continue
            t = fit_temperature(val[0], val[1])
            scaled = apply_temperature(out[0], t)
            per_run.append({**calibration(scaled, out[1]), "auroc": auroc(apply_temperature(test[0], t), scaled)})
            continue
        for part in dig(run.metrics, "uncertainty", "ood_sets") or []:
            if isinstance(part, dict) and part.get("task") == task and isinstance(dig(part, "metrics", row.pass_),
                                                                                  dict):
                got = part["metrics"][row.pass_]
                per_run.append({"accuracy": got.get("accuracy"), "ece": got.get("ece"), "nll": got.get("nll"),
                                "auroc": dig(part, "scores", f"{row.pass_}_max_prob", "auroc")})
    if not per_run:
        return None
    return {k: Stat.of(p[k] for p in per_run) for k in ("accuracy", "ece", "nll", "auroc")}


def ood_columns(study: Study, source: str) -> list[tuple[str, str]]:
    found = {p.get("task") for r in study.runs if r.task == source
             for p in dig(r.metrics, "uncertainty", "ood_sets") or [] if isinstance(p, dict)}
    known = [c for c in OOD_COLUMNS if c[0] != source]  # the four of the protocol, "–" when not scored
    return known + [(t, t) for t in sorted(found - {c[0] for c in OOD_COLUMNS}, key=str)]


# ----------------------------------------------------------------------------------------- published, in shape
def _beats(a: Stat, b: Stat) -> tuple[bool, bool]:
    """(a's mean below b's, and by more than one SE = sqrt(s_a²/n_a + s_b²/n_b); a missing std counts as 0)."""
    var = sum((s.std ** 2 / s.n) if s.n >= 2 else 0.0 for s in (a, b))
    diff = b.mean - a.mean
    return diff > 0, diff > math.sqrt(var) and var > 0


def shape_lines(study: Study) -> list[str]:
    """Orderings computed from the published numbers and from ours (ECE, lower is better)."""
    labels = [label for _, label in TASK_COLUMNS]
    out = []
    for name, values in PUBLISHED_ECE.items():
        if name == "MLE":
            continue
        below = sum(v < m for v, m in zip(values, PUBLISHED_ECE["MLE"]))
        mean_ratio = float(np.mean(values)) / float(np.mean(PUBLISHED_ECE["MLE"]))
        out.append(f"- Published ({PUBLISHED_MODEL}): {name} has a lower ECE than MLE on {below} of {len(values)} "
                   f"tasks; its mean ECE over the six is {mean_ratio:.2f}x MLE's.")
    ours = {row: {label: v["ece"] for task, label in TASK_COLUMNS if (v := id_values(study, task, row))
                  and v["ece"].n} for row in ROWS}
    mle = ours[MLE]
    for row in ROWS[1:]:
        shared = [label for label in labels if label in ours[row] and label in mle]
        if not shared:
            continue
        results = [_beats(ours[row][label], mle[label]) for label in shared]
        ratio = np.mean([ours[row][x].mean for x in shared]) / np.mean([mle[x].mean for x in shared])
        out.append(f"- Ours: {row_label(study, row)} has a lower ECE than MLE LoRA on {sum(r[0] for r in results)} "
                   f"of {len(shared)} tasks ({sum(r[1] for r in results)} by more than one SE); its mean ECE over "
                   f"those tasks is {ratio:.2f}x MLE's.")
    for label in labels:
        ranked = sorted((s.mean, row_label(study, row)) for row in ROWS if (s := ours[row].get(label)))
        if len(ranked) >= 2:
            out.append(f"- Ours, {label}, ECE from lowest: " + " < ".join(f"{n} ({m * 100:.2f})" for m, n in ranked))
    for name, row in PUBLISHED_OURS.items():
        if name == "MLE" or not (shared := [x for x in labels if x in ours[row] and x in mle]):
            continue
        theirs = [PUBLISHED_ECE[name][labels.index(x)] <= PUBLISHED_ECE["MLE"][labels.index(x)] for x in shared]
        ours_ = [ours[row][x].mean <= mle[x].mean for x in shared]
        same = sum(a == b for a, b in zip(theirs, ours_))
        out.append(f"- Same direction as published ({name} vs MLE, ECE): {same} of {len(shared)} tasks "
                   f"({', '.join(shared)}).")
    return out


def published_section(study: Study, models: Sequence[str]) -> list[str]:
    labels = [label for _, label in TASK_COLUMNS]
    rows = [{"source": f"published, {PUBLISHED_MODEL}", "method": name, **{x: f"{v:.1f}" for x, v in zip(labels, vs)}}
            for name, vs in PUBLISHED_ECE.items()]
    for row in ROWS:
        cells = {x: _cell((id_values(study, t, row) or {}).get("ece"), "ece") for t, x in TASK_COLUMNS}
        if any(c != "–" for c in cells.values()):
            rows.append({"source": f"ours, {'/'.join(models)}", "method": row_label(study, row), **cells})
    return ["### Compared with published numbers, in shape only", "",
            f"The published ECEs (x100, 15 bins) are those of issue #14 for {PUBLISHED_MODEL} (BLoB, NeurIPS 2024; "
            "DALorRA), as quoted there: another model, another scale, never comparable number for number. Only the "
            "orderings are compared; every statement below is computed from the two tables.", "",
            _table(rows, ["source", "method", *labels]), "", *shape_lines(study), ""]


# ------------------------------------------------------------------------------------------------------- cost
def cost_lines(study: Study, tasks: Sequence[str]) -> list[str]:
    """Per method over the commonsense tasks: mean train / eval seconds, eval ms per test example, peak memory and
    the mean over tasks of each task's ratio to `lora`."""
    per: dict[tuple[str, str], list[dict[str, float]]] = {}
    for run in study.runs:
        if run.task in tasks:
            memory = run.result.get("peak_memory_mib") or {}
            mem = number(memory.get("cuda"))
            resumed = bool(run.result.get("attempts"))  # its times cover only the last attempt: left out
            per.setdefault((run.task, run.method), []).append({
                "train": math.nan if resumed else number(dig(run.metrics, "wall_time", "train_s")),
                "eval": math.nan if resumed else number(dig(run.metrics, "wall_time", "eval_s")),
                "n": number(dig(run.metrics, "eval", "single", "n")),
                "mem": mem if math.isfinite(mem) else number(memory.get("rss"))})
    def nanmean(values: Sequence[float]) -> float:  # NaN, not a RuntimeWarning, when nothing was measured
        finite = [x for x in values if math.isfinite(x)]
        return float(np.mean(finite)) if finite else math.nan

    def cell(value: float, text: str) -> str:  # e.g. Laplace-LoRA trains nothing: "–", not "nan"
        return text.format(value) if math.isfinite(value) else "–"

    mean = {k: {m: nanmean([r[m] for r in v]) for m in ("train", "eval", "n", "mem")} for k, v in per.items()}
    methods = [m for m in dict.fromkeys(r.method for r in ROWS) if any(k[1] == m for k in mean)]
    methods += sorted({k[1] for k in mean} - set(methods))
    rows = []
    for method in methods:
        keys = [k for k in mean if k[1] == method]
        ratio = {m: [mean[k][m] / mean[(k[0], "lora")][m] for k in keys if (k[0], "lora") in mean]
                 for m in ("train", "eval", "mem")}
        rows.append({"method": method, "tasks": str(len(keys)),
                     "train (s)": cell(nanmean([mean[k]['train'] for k in keys]), "{:.1f}"),
                     "test eval (s)": cell(nanmean([mean[k]['eval'] for k in keys]), "{:.1f}"),
                     "test eval (ms / example)": cell(nanmean([mean[k]['eval'] / mean[k]['n'] * 1e3 for k in keys]),
                                                      "{:.2f}"),
                     "peak memory (MiB)": cell(nanmean([mean[k]['mem'] for k in keys]), "{:.0f}"),
                     **{f"{m} / LoRA": cell(nanmean(v), "{:.2f}x") for m, v in
                        (("train", ratio["train"]), ("eval", ratio["eval"]), ("memory", ratio["mem"]))}})
    if not rows:
        return []
    k = deep_ensemble_sizes(study, tasks)
    sharing = [(run.result.get("hardware") or {}).get("cuda_mps") for run in study.runs if run.task in tasks]
    cols = ["method", "tasks", "train (s)", "test eval (s)", "test eval (ms / example)", "peak memory (MiB)",
            "train / LoRA", "eval / LoRA", "memory / LoRA"]
    return ["### Cost per method (commonsense tasks)", "",
            "Means over every run of the method (all learning rates and seeds) per task, then over the tasks; ratios "
            "are the mean over tasks of each task's ratio to `lora`. Test eval is the run's scoring of its test "
            "split: the single pass AND its M-member ensemble (the `lora` runs too: their test-only masks), so it "
            "does not separate single-pass from ensemble inference; OOD sets and the validation split are scored "
            "outside it. Runs continued from a checkpoint after an interruption (`attempts` in their result) count "
            "for memory, not for time. The times are those of runs sharing a GPU with others (the sweep's workers), "
            f"{sum(x is True for x in sharing)} of {len(sharing)} of them under CUDA MPS (kernels of the sharing "
            "processes side by side; `hardware.cuda_mps`), the rest taking turns: they compare methods only as "
            "far as the methods shared the GPU alike. Derived rows: the deep ensemble costs k = "
            f"{'/'.join(map(str, k)) or '–'} LoRA trainings and k forward passes per example; temperature scaling "
            "one scalar fit on validation predictions (LoRA's cost).", "", _table(rows, cols), ""]


def commonsense_report(study: Study, plots: Path, base: Path, models: Sequence[str]) -> list[str]:
    """The section (Markdown lines), empty when the study has no commonsense task; `models`: the models' labels."""

    tasks = commonsense_tasks(study)
    if not tasks:
        return []
    try:
        return _section(study, tasks, plots, base, models)
    finally:
        for cached in (id_values, ood_values, row_predictions):
            cached.cache_clear()


def _section(study: Study, tasks: list[str], plots: Path, base: Path, models: Sequence[str]) -> list[str]:
    cols = columns(study)
    out = ["## Commonsense multiple choice (published layout)", "",
           "Rows: MLE LoRA (single pass), MC dropout (PEFT dropout kept on at test, M passes), a deep ensemble of "
           "the LoRA seeds, temperature scaling of the LoRA runs (T fitted on each run's validation predictions), "
           "LoRA Dropout (paper setting: p=0.5, N=4) single pass and M-member ensemble, the 1x-cost variant, and "
           "Laplace-LoRA where results exist; each at the setting chosen on validation (Selection protocol). Cells: "
           "mean ± std over seeds (the deep ensemble: one number); \"–\": not run; bold: the column's best mean.", ""]
    for metric in ("accuracy", "ece", "nll"):
        table = layout_table(study, metric, cols, lambda t, r: id_values(study, t, r))
        out += [f"### {METRICS[metric][0]}", "", table, ""] if table else []
    notes = []
    for task in tasks:
        ens = deep_ensemble(study, task)
        if ens is not None and ens.skipped is not None:
            notes.append(f"- {task}: deep ensemble of k={ens.k} {ens.skipped}.")
        elif ens is None and study.choices.get((task, "lora")):
            notes.append(f"- {task}: no deep ensemble (it needs at least 2 `lora` seeds with test predictions at the "
                         "chosen lr).")
    out += ["Deep ensemble not formed:", "", *notes, ""] if notes else []
    for source in ood_sources(study):
        ood_cols = ood_columns(study, source)
        out += [f"### Out of distribution: trained on {source}", "",
                f"The {source} runs scored, by the same trained model, on each OOD set's evaluation split "
                "(`ood_task`). Temperature scaling uses the T fitted on the in-distribution validation split; "
                f"AUROC: OOD detection by 1 − max p against the {source} test split (OOD positive).", ""]
        for metric in ("accuracy", "ece", "nll", "auroc"):
            table = layout_table(study, metric, ood_cols, lambda t, r, s=source: ood_values(study, s, t, r))
            out += [f"#### {METRICS[metric][0]} on the OOD sets", "", table, ""] if table else []
    risk = risk_section(study, [c for c in cols if c[0] in tasks], [(row_label(study, r), r) for r in ROWS], plots,
                        base)
    return out + published_section(study, models) + risk + cost_lines(study, tasks)


__all__ = ["commonsense_report", "commonsense_tasks"]
