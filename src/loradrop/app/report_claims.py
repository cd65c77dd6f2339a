"""The claims table of ``loradrop report``: each claim of Lin et al. (arXiv 2404.09610) checked on the study's runs.

Verdict rule: ``diff = mean(A) - mean(B)`` over the seeds at the chosen settings, ``SE = sqrt(s_A²/n_A + s_B²/n_B)``
(sample std); *agree* when diff has the paper's sign and ``|diff| > SE``, *disagree* when it has the opposite sign
and ``|diff| > SE``, *unclear* otherwise (also with fewer than 2 seeds on a side); *not run* when the runs the claim
needs are missing. An average over tasks uses the mean of the per-task differences and ``SE = sqrt(sum SE_t²) / T``.
A "matches" claim (C10) agrees unless A is below B by more than one SE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..tasks import CATALOG
from .report_mmlu import is_mmlu_task
from .report_tables import FORMATS, MMLU_SHOTS, NAN, Stat, Study, dig, number

AGREE, DISAGREE, UNCLEAR, NOT_RUN = "agree", "disagree", "unclear", "not run"
LD = ("ld_paper", "ensemble")
LORA = ("lora", "single")
NAMES = {LD: "LD (train + test)", LORA: "LoRA", ("ld_paper", "single"): "LD (train only)",
         ("lora", "ensemble"): "LoRA + test-only masks", ("adalora", "single"): "AdaLoRA",
         ("ld_1x", "ensemble"): "LD 1x", ("ld_1x", "single"): "LD 1x (train only)",
         ("adalora_ld", "ensemble"): "AdaLoRA + LD", ("adalora_ld", "single"): "AdaLoRA + LD (train only)"}


@dataclass
class Claim:
    cid: str
    claim: str
    paper: str
    ours: str
    verdict: str
    why: str


@dataclass(frozen=True)
class Diff:
    diff: float
    se: float
    a: Stat
    b: Stat


def difference(a: Stat, b: Stat, scale: float = 1.0) -> Diff:
    se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n) if a.n >= 2 and b.n >= 2 else NAN
    return Diff((a.mean - b.mean) * scale, se * scale, a, b)


def verdict(diff: float, se: float, sign: int) -> str:
    """agree / disagree / unclear for a difference whose expected sign (the paper's) is `sign` (+1 or -1)."""
    if not (math.isfinite(diff) and math.isfinite(se)) or abs(diff) <= se:
        return UNCLEAR
    return AGREE if diff * sign > 0 else DISAGREE


def match_verdict(diff: float, se: float) -> str:
    """A "matches" claim: disagree only when A is worse than B by more than one SE."""
    if not (math.isfinite(diff) and math.isfinite(se)):
        return UNCLEAR
    return DISAGREE if diff < -se else AGREE


def average(diffs: Sequence[Diff]) -> tuple[float, float]:
    return float(np.mean([d.diff for d in diffs])), math.sqrt(sum(d.se ** 2 for d in diffs)) / len(diffs)


def _pair(study: Study, task: str, a: tuple[str, str], b: tuple[str, str], metric: str) -> Diff | None:
    ra, rb = study.row(task, *a), study.row(task, *b)
    if ra is None or rb is None or metric not in ra.values or metric not in rb.values \
            or not ra.values[metric].n or not rb.values[metric].n:
        return None
    return difference(ra.values[metric], rb.values[metric], FORMATS[metric][0])


def _num(value: float, digits: int, sign: bool = True) -> str:
    return "–" if not math.isfinite(value) else f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _diff_text(d: Diff | tuple[float, float], digits: int) -> str:
    diff, se = (d.diff, d.se) if isinstance(d, Diff) else d
    return f"{_num(diff, digits)} (SE {_num(se, digits, sign=False)})"


def compare(study: Study, cid: str, claim: str, paper: str, a: tuple[str, str], b: tuple[str, str], metric: str,
            sign: int, *, tasks: Sequence[str] | None = None, note: str = "", matches: bool = False) -> Claim:
    """A claim "A beats B" (sign +1) or "A is below B" (sign -1) on `metric`, on one task or averaged over tasks."""
    tasks = study.tasks if tasks is None else [t for t in tasks if t in study.tasks]
    if metric in ("ece", "nll", "brier", "gap"):
        tasks = [t for t in tasks if not study.info[t].regression]
    found = {t: d for t in tasks if (d := _pair(study, t, a, b, metric)) is not None}
    # a verdict needs seeds on both sides: tasks with a single seed on a side are listed but left out of it
    per = {t: d for t, d in found.items() if d.a.n >= 2 and d.b.n >= 2} or found
    single = sorted(set(found) - set(per))
    name_a, name_b = NAMES.get(a, f"{a[0]} {a[1]}"), NAMES.get(b, f"{b[0]} {b[1]}")
    if not per:
        return Claim(cid, claim, paper, "–", NOT_RUN, f"needs {name_a} and {name_b} runs ({metric}){note}")
    digits = FORMATS[metric][1]
    if len(per) == 1:
        task, d = next(iter(per.items()))
        scale = FORMATS[metric][0]
        ours = (f"{task}: {name_a} {d.a.fmt(scale, digits)} vs {name_b} {d.b.fmt(scale, digits)}: "
                f"{_diff_text(d, digits)}")
        diff, se = d.diff, d.se
    else:
        diff, se = average(list(per.values()))
        ours = f"{name_a} − {name_b}, mean over {len(per)} tasks: {_diff_text((diff, se), digits)}"
    result = match_verdict(diff, se) if matches else verdict(diff, se, sign)
    seeds = ", ".join(f"{t} {_diff_text(d, digits)} n={d.a.n}/{d.b.n}" for t, d in per.items())
    why = f"{metric}; {seeds}{note}"
    if single:
        why += "; left out (one seed on a side): " + ", ".join(
            f"{t} {_num(found[t].diff, digits)}" for t in single)
    untuned = sorted({f"{NAMES.get(side, side[0])} on {t}" for t in per for side in (a, b)
                      if (row := study.row(t, *side)) is not None and len(row.choice.candidates) < 2})
    if untuned:
        why += "; NOT TUNED (one learning rate only, not chosen on validation): " + ", ".join(untuned)
    if result == UNCLEAR and any(d.a.n < 2 or d.b.n < 2 for d in per.values()):
        why += "; fewer than 2 seeds on a side"
    return Claim(cid, claim, paper, ours, result, why)


# --------------------------------------------------------------------------------------------------- sensitivity
def sensitivity_values(study: Study, task: str, method: str = "ld_sens") -> tuple[dict[tuple, dict[int, float]], str]:
    """``{(p, samples): {seed: test main metric}}`` of the `method` grid at each setting's chosen lr, and the pass
    used (the ensemble where every setting has one, else the single pass)."""
    choices = study.choices.get((task, method), [])
    main = study.info[task].main if task in study.info else "accuracy"
    has_ensemble = bool(choices) and all(dig(r.metrics, "eval", "ensemble", main) is not None
                                         for c in choices for r in c.runs)
    pass_ = "ensemble" if has_ensemble else "single"
    grid: dict[tuple, dict[int, float]] = {}
    for choice in choices:
        local: dict[str, Any] = dict(choice.local)
        settings = choice.runs[0].settings
        key = (local.get("p", settings.get("p")), local.get("samples", settings.get("samples")))
        grid[key] = {r.seed: number(dig(r.metrics, "eval", pass_, main)) for r in choice.runs}
    return grid, pass_


def _averaged(grid: dict[tuple, dict[int, float]], axis: int) -> dict[Any, Stat]:
    """Per value of one grid axis (0: p, 1: samples), per seed the mean over the other axis (seeds present at all
    of its values), as a `Stat` over seeds."""
    out = {}
    for value in sorted({k[axis] for k in grid}, key=lambda v: (v is None, v)):
        cells = [seeds for k, seeds in grid.items() if k[axis] == value]
        common = set.intersection(*(set(c) for c in cells))
        out[value] = Stat.of(np.mean([c[s] for c in cells]) for s in sorted(common))
    return out


def _shape(stats: dict[Any, Stat], label: str) -> tuple[str, Any, bool]:
    means = [s.mean for s in stats.values()]
    keys = list(stats)
    best = keys[int(np.nanargmax(means))]
    diffs = np.diff(means)
    monotonic = bool(np.all(diffs >= 0) or np.all(diffs <= 0))
    text = ", ".join(f"{label}={k}: {s.fmt(100.0, 2)}" for k, s in stats.items())
    return text, best, monotonic


def sensitivity_claims(study: Study) -> list[Claim]:
    """C8 (rises with N) and C9 (inverted U in p) from the `ld_sens` grid on MRPC (else the first task with one)."""
    tasks = [t for t in study.tasks if (t, "ld_sens") in study.choices]
    c8 = ("C8", "accuracy rises with the number of masks N (MRPC)", "n/a (MRPC figure)")
    c9 = ("C9", "inverted U in p: a middle p is best (MRPC)", "n/a (MRPC figure)")
    if not tasks:
        return [Claim(*c, "–", NOT_RUN, "needs the ld_sens grid (p x samples)") for c in (c8, c9)]
    task = "mrpc" if "mrpc" in tasks else tasks[0]
    grid, pass_ = sensitivity_values(study, task)
    where = f"{task}, {pass_} pass, test {study.info[task].main}"
    out = []
    by_n = _averaged(grid, 1)
    if len(by_n) < 2:
        out.append(Claim(*c8, "–", NOT_RUN, f"{where}: only one samples value"))
    else:
        text, best, monotonic = _shape(by_n, "N")
        keys = list(by_n)
        d = difference(by_n[keys[-1]], by_n[keys[0]], 100.0)
        ours = f"{text}; N={keys[-1]} − N={keys[0]}: {_diff_text(d, 2)}"
        why = f"{where}, mean over p; argmax N={best}; {'monotonic' if monotonic else 'not monotonic'} in N"
        out.append(Claim(*c8, ours, verdict(d.diff, d.se, +1), why))
    by_p = _averaged(grid, 0)
    if len(by_p) < 3:
        out.append(Claim(*c9, "–", NOT_RUN, f"{where}: fewer than 3 values of p"))
    else:
        text, best, monotonic = _shape(by_p, "p")
        keys = list(by_p)
        inner = max(keys[1:-1], key=lambda k: by_p[k].mean)
        d = min((difference(by_p[inner], by_p[end], 100.0) for end in (keys[0], keys[-1])), key=lambda x: x.diff)
        ours = f"{text}; best inner p={inner} − better end: {_diff_text(d, 2)}"
        why = f"{where}, mean over N; argmax p={best}; {'monotonic' if monotonic else 'not monotonic'} in p"
        out.append(Claim(*c9, ours, verdict(d.diff, d.se, +1), why))
    return out


# ------------------------------------------------------------------------------------------------------ claims
def claims(study: Study) -> list[Claim]:
    """Every claim row, in the paper's order."""
    paper = {"rte": "+2.89 (RTE)", "squad": "EM 86.6 → 88.2 (+1.6); ours: F1"}
    out = [compare(study, f"C1 ({task})", "LoRA Dropout beats LoRA", paper.get(task, "n/a"),
                   LD, LORA, "main", +1, tasks=[task]) for task in study.tasks
           if not is_mmlu_task(study, task)]  # an SFT task's comparison is C11 (MMLU), below
    # SQuAD (and any non-GLUE task) has its own C1 row but is not part of the GLUE average
    glue = [t for t in study.tasks if t in CATALOG and CATALOG[t].family == "glue"]
    if glue:  # (the paper's GLUE rows; a study without GLUE tasks, e.g. the LLM ones, leaves them out)
        out.append(compare(study, "C1 (average)", "LoRA Dropout beats LoRA on GLUE tasks",
                           "88.50 → 89.54 (+1.04), 8 GLUE tasks, DeBERTaV3-base", LD, LORA, "main", +1, tasks=glue,
                           note=f"; our GLUE tasks: {', '.join(glue)} (paper: all 8 GLUE tasks)"))
        out.append(compare(study, "C2", "RTE +2.89 points (LoRA Dropout vs LoRA)", "+2.89", LD, LORA, "main", +1,
                           tasks=["rte"], note="; the verdict checks the sign, the paper's size is +2.89"))
    out.append(compare(study, "C3a", "LoRA Dropout beats AdaLoRA", "n/a", LD, ("adalora", "single"), "main", +1))
    adalora_ld = [("adalora_ld", p) for p in ("ensemble", "single")
                  if any(study.row(t, "adalora_ld", p) for t in study.tasks)]
    out.append(compare(study, "C3b", "AdaLoRA + LoRA Dropout beats AdaLoRA", "n/a",
                       adalora_ld[0] if adalora_ld else ("adalora_ld", "ensemble"), ("adalora", "single"), "main", +1))
    if glue:
        out.append(compare(study, "C4", "LoRA Dropout has lower ECE (RTE)", "n/a (lower)", LD, LORA, "ece", -1,
                           tasks=["rte"], note="; ECE in %, lower is better"))
    out.append(compare(study, "C5", "smaller train/test loss gap (final validation NLL − last-epoch train loss)",
                       "n/a (SST-2)", ("ld_paper", "single"), ("lora", "single"), "gap", -1,
                       note="; paper: SST-2, ours: the tasks listed"))
    masks = [t for t in study.tasks if (r := study.row(t, "lora", "ensemble")) is not None
             and r.choice.runs[0].ensemble_kind == "masks"]
    out.append(compare(study, "C6", "dropout at test time only is worse than none", "n/a (MRPC, CoLA)",
                       ("lora", "ensemble"), LORA, "main", -1, tasks=masks,
                       note="; paper: MRPC, CoLA, ours: the tasks listed"))
    out.append(compare(study, "C7", "train + test beats train only", "n/a (MRPC, CoLA)", LD, ("ld_paper", "single"),
                       "main", +1, note="; paper: MRPC, CoLA, ours: the tasks listed"))
    out.extend(sensitivity_claims(study))
    mmlu = [t for t in study.tasks if is_mmlu_task(study, t)]  # instruction tuning, then MMLU (the paper's LLM claim)
    for shot in MMLU_SHOTS:
        out.append(compare(study, f"C11 ({shot[5]}-shot)", f"LoRA Dropout beats LoRA on MMLU {shot[5]}-shot after "
                           "instruction tuning", "n/a (LLaMA2-7B, SFT on Alpaca-clean; MMLU)", LD, LORA,
                           shot, +1, tasks=mmlu, note="; accuracy in points, per SFT data set"))
    both = [t for t in study.tasks if study.row(t, "ld_1x", "ensemble") and study.row(t, "ld_paper", "ensemble")]
    pass_ = "ensemble" if both else "single"
    out.append(compare(study, "C10", "1x-cost LoRA Dropout (samples=1) matches the N=4 objective", "n/a",
                       ("ld_1x", pass_), ("ld_paper", pass_), "main", +1, tasks=both or None, matches=True,
                       note=f"; {pass_} passes; ld_1x at its validation-chosen setting"))
    return out


__all__ = ["Claim", "claims", "difference", "match_verdict", "sensitivity_values", "verdict"]
