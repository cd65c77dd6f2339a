"""The "MMLU after instruction tuning" section of ``loradrop report``: runs of the SFT tasks (``alpaca``, ``lima``,
``instruct``), whose evaluation is MMLU 0-shot and 5-shot (`loradrop.tasks.mmlu.evaluate_mmlu`: ``eval.single`` /
``eval.ensemble`` hold ``mmlu_0shot`` and ``mmlu_5shot``, each with accuracy, macro accuracy, ECE, NLL, Brier, n).

One table per SFT task: each method's single pass and test-time ensemble at its chosen learning rate (the report's
selection: lowest mean SFT validation loss over the common seeds, `report_tables.validation_score`), mean ± std
over seeds; plus the accuracy difference to plain LoRA paired by seed (the runs of one seed score the same MMLU
questions: the subset is drawn with the run's seed). These runs have no "test loss", so the generic per-task tables
leave them out (`is_mmlu_task`); their MMLU predictions hold 0-shot and 5-shot rows of per-seed question subsets, so
no deep ensemble across seeds is formed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .plots import format_table
from .report_tables import MMLU_SHOTS, PASSES, Run, Stat, Study, dig, row_name

SHOTS = MMLU_SHOTS
COLUMNS = (("accuracy", "acc. (%)", 100.0, 2), ("ece", "ECE (%)", 100.0, 2), ("nll", "NLL", 1.0, 4))

TEXT = (
    "Instruction tuning (SFT on the task's data, loss on the response tokens only), then MMLU scored {scoring}, "
    "0-shot and 5-shot (the first five dev questions of the subject), with the single pass and with the batched "
    "test-time ensemble of LoRA Dropout masks. Mean ± std over seeds (n); accuracy and ECE (15 bins) in %, NLL of "
    "the four answer probabilities (Brier: in each run's metrics). Δ vs LoRA: the accuracy difference to the "
    "`lora` single pass, paired by seed (a seed's runs score the same questions), mean ± std over the common seeds. "
    "The learning rate is the one with the lowest mean SFT validation loss over the seeds common to every candidate "
    "(one candidate: no choice). MMLU questions per run: {questions}.")


def is_mmlu_task(study: Study, task: str) -> bool:
    """Whether `task`'s runs are SFT runs scored on MMLU (the section here, not the generic tables)."""
    runs = [r for r in study.runs if r.task == task]
    return bool(runs) and all(dig(r.metrics, "eval", "single", SHOTS[0]) is not None for r in runs)


def _cells(runs: list[Run], pass_: str, shot: str) -> dict[str, Stat]:
    return {key: Stat.of(dig(r.metrics, "eval", pass_, shot, key) for r in runs) for key, *_ in COLUMNS}


def _delta(runs: list[Run], pass_: str, shot: str, baseline: dict[int, Run]) -> str:
    diffs = [dig(r.metrics, "eval", pass_, shot, "accuracy") - dig(b.metrics, "eval", "single", shot, "accuracy")
             for r in runs if (b := baseline.get(r.seed)) is not None
             and dig(r.metrics, "eval", pass_, shot, "accuracy") is not None
             and dig(b.metrics, "eval", "single", shot, "accuracy") is not None]
    return Stat.of(diffs).fmt(100.0, 2) + (f" (n={len(diffs)})" if diffs else "")


def _rows(study: Study, task: str) -> list[dict[str, str]]:
    lora = study.choices.get((task, "lora"), [])
    baseline = {r.seed: r for r in lora[0].runs} if len(lora) == 1 else {}
    rows = []
    for method in study.methods(task, side=None):
        for choice in study.choices[(task, method)]:
            for pass_ in PASSES:
                runs = [r for r in choice.runs if dig(r.metrics, "eval", pass_, SHOTS[0]) is not None]
                if not runs:
                    continue
                first = runs[0]
                cells: dict[str, Any] = {
                    "row": row_name(method, pass_, first.ensemble_kind, first.settings), "lr": f"{choice.lr:g}",
                    "SFT val. loss": Stat.of(dig(r.metrics, "eval", "single", "sft_validation_loss")
                                             for r in runs).fmt(1.0, 4)}
                for shot in SHOTS:
                    k = shot[5]
                    stats = _cells(runs, pass_, shot)
                    cells.update({f"{k}-shot {title}": stats[key].fmt(scale, digits)
                                  for key, title, scale, digits in COLUMNS})
                    if method != "lora" or pass_ != "single":
                        cells[f"{k}-shot Δ vs LoRA"] = _delta(runs, pass_, shot, baseline) if baseline else "–"
                cells["n seeds"] = str(len(runs))
                rows.append(cells)
    return rows


def _questions(runs: list[Run]) -> str:
    found = sorted({(dig(r.metrics, "data", "mmlu", "questions"), str(dig(r.metrics, "data", "mmlu", "subset")))
                    for r in runs}, key=str)
    return "; ".join(f"{n} ({subset})" for n, subset in found) or "not recorded"


SCORING = {"letter": "by the answer letters' next-token probabilities (softmax over A-D)",
           "cloze_mean": "in cloze form (each choice's text after \"Answer:\", its mean token log-likelihood, softmax "
                         "over the four choices; the shots answered with text)",
           "cloze": "in cloze form (each choice's text after \"Answer:\", its summed token log-likelihood, softmax "
                    "over the four choices; the shots answered with text)"}


def choice_scorings(runs: Iterable[Run]) -> list[str]:
    """How the runs' multiple choice was scored (``choice_scoring``; unset: letter), each once."""
    return sorted({str(r.settings.get("choice_scoring") or "letter") for r in runs})


def _scoring(runs: list[Run]) -> str:
    found = choice_scorings(runs)
    return "; ".join(f"{SCORING.get(f, f)}" + (f" (`{f}` runs)" if len(found) > 1 else "") for f in found)


def mmlu_report(study: Study) -> list[str]:
    """The section's Markdown lines (empty when no run is an SFT run scored on MMLU)."""
    tasks = [t for t in study.tasks if is_mmlu_task(study, t)]
    if not tasks:
        return []
    runs = [r for r in study.runs if r.task in tasks]
    out = ["## MMLU after instruction tuning", "", TEXT.format(scoring=_scoring(runs), questions=_questions(runs)), ""]
    for task in tasks:
        rows = _rows(study, task)
        columns = ["row", "lr", *(f"{s[5]}-shot {title}" for s in SHOTS for title in
                                  ("acc. (%)", "Δ vs LoRA", "ECE (%)", "NLL")), "SFT val. loss", "n seeds"]
        clean = [{c: str(row.get(c, "–")).replace("|", "\\|") for c in columns} for row in rows]
        out += [f"### SFT on {task} -> MMLU", "", format_table(clean, columns, markdown=True), ""]
    return out


__all__ = ["choice_scorings", "is_mmlu_task", "mmlu_report"]
