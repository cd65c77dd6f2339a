"""The numbers behind ``loradrop report``: sweep results read into runs, the selection protocol, mean ± std rows,
post-hoc temperature scaling, the deep ensemble across seeds and the cost table (rendered by `report`).

Selection protocol: for each (task, method, setting of the method's other local axes) the learning rate is the
candidate with the best validation main metric (``best_epoch``: the best epoch of the single pass on the held-out
validation split; the final model's validation score when a run has no per-epoch evaluation), averaged over the
seeds present at every candidate (the common seeds). For the methods in `SELECT_LOCAL` the local axes are chosen the
same way, jointly with the lr. Every seed at the chosen setting is then reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..calibration import classification_calibration

GRID_AXES = ("task", "lr", "seed")
SELECT_LOCAL = ("ld_1x",)  # methods whose local axes are chosen by validation like the lr
SIDE_METHODS = ("ld_sens", "ld_strategy")  # grids with their own sections instead of rows of the main table
METHOD_ORDER = ("lora", "lora_peft_dropout", "ld_paper", "ld_1x", "adalora", "adalora_ld", *SIDE_METHODS)
PASSES = ("single", "ensemble")
LOWER_IS_BETTER = ("loss", "nll", "ece", "brier")  # the rule of app.epochs (not imported: it loads transformers)
CALIBRATION = ("ece", "nll", "brier")
NAN = float("nan")


def dig(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...``, or None where a level is missing."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else NAN


def sort_key(value: Any) -> tuple:
    """Numbers in numeric order before text; tuples element by element (stable, deterministic)."""
    if isinstance(value, tuple):
        return tuple(sort_key(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def local_text(local: Iterable[tuple[str, Any]]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in local)


# ------------------------------------------------------------------------------------------------------- runs
@dataclass(eq=False)
class Run:
    """One successful sweep result (its predictions are read again from `path` only when needed)."""

    path: Path
    plan: str
    run_id: str
    method: str
    task: str
    lr: float
    seed: int
    local: tuple[tuple[str, Any], ...]
    result: dict[str, Any]
    _predictions: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_result(cls, path: Path, data: dict[str, Any]) -> Run:
        axes, settings, metrics = data.get("axes") or {}, data.get("settings") or {}, data.get("metrics") or {}
        slim = {k: v for k, v in data.items() if k not in ("predictions", "loss_history")}
        task = axes.get("task", settings.get("task", metrics.get("task", "?")))
        return cls(path=path, plan=str(data.get("plan", "")), run_id=str(data.get("run_id", path.stem)),
                   method=str(data.get("method", "?")), task=str(task),
                   lr=number(axes.get("lr", settings.get("lr"))), seed=int(axes.get("seed", settings.get("seed", 0))),
                   local=tuple(sorted((k, v) for k, v in axes.items() if k not in GRID_AXES)), result=slim)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.result.get("metrics") or {}

    @property
    def settings(self) -> dict[str, Any]:
        return self.result.get("settings") or {}

    @property
    def ensemble_kind(self) -> str:
        return str(dig(self.metrics, "config", "ensemble_kind") or "none")

    def predictions(self, split: str) -> dict[str, Any] | None:
        if self._predictions is None:
            self._predictions = json.loads(self.path.read_text(encoding="utf-8")).get("predictions") or {}
        return self._predictions.get(split)

    def last_epoch(self) -> dict[str, Any]:
        epochs = self.metrics.get("epochs") or []
        return epochs[-1] if epochs else {}


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str
    main: str
    spec: Any  # the registry TaskSpec (official metrics), None for a task the registry does not know

    @property
    def regression(self) -> bool:
        return self.kind == "regression"

    def main_of(self, values: np.ndarray, labels: np.ndarray) -> float:
        """The official main metric of predictions (probabilities or regression values)."""
        if self.spec is not None:
            from ..errors import DataError

            try:
                return float(self.spec.metrics(self.spec, values, labels)[self.main])
            except DataError:  # e.g. a correlation of constant values
                return NAN
        if self.main == "accuracy" and not self.regression:
            return float((values.argmax(1) == labels).mean())
        return NAN


def task_info(task: str, runs: Sequence[Run]) -> TaskInfo:
    from ..errors import DataError
    from ..tasks import get_task

    try:
        spec = get_task(task)
        return TaskInfo(task, spec.kind, spec.main_metric, spec)
    except DataError:  # a task outside the registry: the kind from the runs, the first known metric as main
        kind = str(runs[0].metrics.get("kind", "classification"))
        single = dig(runs[0].metrics, "eval", "single") or {}
        main = next((m for m in ("accuracy", "pearson", "f1", "matthews_correlation") if m in single), "accuracy")
        return TaskInfo(task, kind, main, None)


def validation_score(run: Run, main: str) -> float:
    """The run's selection score: best-epoch validation main metric, else the final model's validation score."""
    best = run.metrics.get("best_epoch") or {}
    value = dig(best, "validation", "single", main)
    if value is None and best.get("metric") == main:
        value = best.get("value")
    if value is None:
        value = dig(run.metrics, "eval", "validation", "single", main)
    if value is None and main == "loss":  # SFT runs (scored on MMLU): the loss on their held-out responses
        value = dig(run.metrics, "eval", "single", "sft_validation_loss")
    return number(value)


# ---------------------------------------------------------------------------------------------------- numbers
@dataclass(frozen=True)
class Stat:
    """Values over seeds: mean, sample std (ddof=1), n (non-finite values left out)."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[Any]) -> Stat:
        return cls(tuple(v for v in (number(x) for x in values) if math.isfinite(v)))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else NAN

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else NAN

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        if not self.n:
            return "–"
        if self.n == 1:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


# metric -> (scale, digits): main metrics in points (x100) like the paper, ECE in %, NLL and Brier as they are
MMLU_SHOTS = ("mmlu_0shot", "mmlu_5shot")  # an SFT run's MMLU scores, by shot setting (report_mmlu)
FORMATS = {"main": (100.0, 2), "best": (100.0, 2), "accuracy": (100.0, 2), "ece": (100.0, 2), "nll": (1.0, 4),
           "brier": (1.0, 4), "T": (1.0, 2), "gap": (1.0, 4), **dict.fromkeys(MMLU_SHOTS, (100.0, 2))}


def fmt(stat: Stat | None, metric: str) -> str:
    if stat is None:
        return "–"
    scale, digits = FORMATS.get(metric, (1.0, 3))
    return stat.fmt(scale, digits)


# -------------------------------------------------------------------------------------------------- selection
@dataclass
class Choice:
    """The chosen setting of one (task, method[, local axes]) group, with every seed run there."""

    task: str
    method: str
    local: tuple[tuple[str, Any], ...]
    lr: float
    runs: list[Run]
    candidates: list[tuple[tuple, float, float]]  # (local, lr, validation score over the common seeds)
    common_seeds: tuple[int, ...]
    note: str = ""

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(r.seed for r in self.runs)


def select(runs: Sequence[Run], main: str) -> Choice:
    """The best (local axes, lr) candidate of `runs` by mean validation score over the common seeds."""
    by_candidate: dict[tuple, list[Run]] = {}
    for run in runs:
        by_candidate.setdefault((run.local, run.lr), []).append(run)
    candidates = sorted(by_candidate, key=sort_key)
    common = set.intersection(*({r.seed for r in by_candidate[c]} for c in candidates))
    note = "" if common else "no seed is common to every candidate: each candidate's own seeds"
    scores = []
    for candidate in candidates:
        values = [validation_score(r, main) for r in by_candidate[candidate] if not common or r.seed in common]
        finite = [v for v in values if math.isfinite(v)]
        scores.append(float(np.mean(finite)) if finite else NAN)
    ranked = [i for i, s in enumerate(scores) if math.isfinite(s)]
    sign = -1.0 if main in LOWER_IS_BETTER else 1.0
    if ranked:
        best = max(ranked, key=lambda i: (sign * scores[i], -i))  # ties: the first candidate in sorted order
    else:
        best, note = 0, "no validation score: the first candidate"
    local, lr = candidates[best]
    chosen = sorted(by_candidate[(local, lr)], key=lambda r: r.seed)
    return Choice(runs[0].task, runs[0].method, local, lr, chosen,
                  [(c[0], c[1], s) for c, s in zip(candidates, scores)], tuple(sorted(common)), note)


def _at_lora_choice(lora: Choice, group: Sequence[Run], chosen: Choice) -> Choice:
    """Laplace-LoRA's choice: its results on LoRA's chosen runs. Its validation score is its LoRA run's, so the
    two choices agree whenever Laplace was fitted at every LoRA candidate; where it was not (a fit missing at LoRA's
    chosen rate), another rate's Laplace would be another model's, so the note says so."""
    if (chosen.local, chosen.lr) == (lora.local, lora.lr):
        return chosen
    if at := [r for r in group if (r.local, r.lr) == (lora.local, lora.lr)]:
        return replace(chosen, local=lora.local, lr=lora.lr, runs=sorted(at, key=lambda r: r.seed),
                       note="at LoRA's chosen setting")
    return replace(chosen, note=f"no Laplace result at LoRA's chosen lr {lora.lr:g}: shown at its own best lr, "
                                "i.e. not on the LoRA model reported")


@dataclass
class Row:
    """One row of a results table: a method's single pass or ensemble at its chosen setting, over seeds."""

    name: str
    choice: Choice
    pass_: str
    values: dict[str, Stat]


def row_name(method: str, pass_: str, kind: str, settings: dict[str, Any]) -> str:
    single = pass_ == "single"
    if method == "lora":
        return "LoRA" if single else {"masks": "LoRA + LoRA Dropout masks at test only"}.get(kind, f"LoRA ({kind})")
    if method == "lora_peft_dropout":
        return f"LoRA + PEFT dropout {settings.get('peft_dropout', 0.1):g}" if single else "MC dropout"
    if method == "ld_paper":
        return "LoRA Dropout (train only)" if single else "LoRA Dropout (train + test)"
    if method == "ld_1x":
        return "LoRA Dropout 1x cost, samples=1 (train only)" if single else "LoRA Dropout 1x cost (train + test)"
    if method == "adalora":
        return "AdaLoRA" if single else f"AdaLoRA ({kind} ensemble)"
    if method == "laplace":  # post hoc on the `lora` runs: its MAP is the LoRA model, its predictive the posterior's
        return "Laplace-LoRA, MAP (single pass)" if single else "Laplace-LoRA (KFAC, GLM predictive)"
    if method == "adalora_ld":
        return "AdaLoRA + LoRA Dropout (train only)" if single else "AdaLoRA + LoRA Dropout (train + test)"
    kinds = {"lora_dropout": "LoRA Dropout ensemble", "mc_dropout": "MC dropout ensemble",
             "masks": "test-only masks ensemble"}
    return f"{method} (single pass)" if single else f"{method} ({kinds.get(kind, f'{kind} ensemble')})"


def run_values(run: Run, pass_: str, main: str) -> dict[str, float]:
    m = run.metrics
    out = {"main": number(dig(m, "eval", pass_, main)), "best": number(dig(m, "best_epoch", "test", pass_, main))}
    for k in CALIBRATION:  # span tasks (SQuAD) report the calibration of their start/end distributions: span_*
        value = dig(m, "eval", pass_, k)
        out[k] = number(value if value is not None else dig(m, "eval", pass_, f"span_{k}"))
    if dig(m, "eval", pass_, "exact_match") is not None:  # SQuAD's second official metric
        out["em"] = number(dig(m, "eval", pass_, "exact_match"))
    for shot in MMLU_SHOTS:  # SFT runs scored on MMLU (report_mmlu): each shot setting's accuracy
        if dig(m, "eval", pass_, shot, "accuracy") is not None:
            out[shot] = number(dig(m, "eval", pass_, shot, "accuracy"))
    if pass_ == "single":  # the train/validation loss gap of the final model
        out["gap"] = number(dig(m, "eval", "validation", "single", "nll")) - number(run.last_epoch().get("train_loss"))
    return out


def rows_of(choice: Choice, main: str) -> list[Row]:
    rows = []
    for pass_ in PASSES:
        per_run = [run_values(r, pass_, main) for r in choice.runs]
        values = {k: Stat.of(v.get(k, NAN) for v in per_run) for k in dict.fromkeys(k for v in per_run for k in v)}
        if values["main"].n or any(values[k].n for k in MMLU_SHOTS if k in values):  # (SFT runs' main metric,
            # the test loss, is not scored: their MMLU accuracies are what they report)
            first = choice.runs[0]
            rows.append(Row(row_name(choice.method, pass_, first.ensemble_kind, first.settings), choice, pass_,
                            values))
    return rows


class Study:
    """All runs, grouped and selected: ``choices[(task, method)]`` is one `Choice` per local setting (one for
    `SELECT_LOCAL` methods and methods without local axes)."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs)
        self.tasks = sorted({r.task for r in self.runs})
        self.info = {t: task_info(t, [r for r in self.runs if r.task == t]) for t in self.tasks}
        groups: dict[tuple[str, str, tuple], list[Run]] = {}
        for run in self.runs:
            local = () if run.method in SELECT_LOCAL else run.local
            groups.setdefault((run.task, run.method, local), []).append(run)
        self.choices: dict[tuple[str, str], list[Choice]] = {}
        for (task, method, _), group in sorted(groups.items(), key=lambda kv: sort_key(kv[0])):
            self.choices.setdefault((task, method), []).append(select(group, self.info[task].main))
        for (task, method, _), group in groups.items():  # Laplace-LoRA is post hoc on LoRA's chosen model
            if method == "laplace" and len(self.choices.get((task, "lora"), [])) == 1:
                self.choices[(task, method)] = [_at_lora_choice(self.choices[(task, "lora")][0], group,
                                                                self.choices[(task, method)][0])]

    def methods(self, task: str, *, side: bool | None = False) -> list[str]:
        """Methods run on `task`: the known ones in study order, then the rest by name (`side`: only / without
        the side grids, None: all)."""
        found = {m for t, m in self.choices if t == task}
        ordered = [m for m in METHOD_ORDER if m in found] + sorted(found - set(METHOD_ORDER))
        return [m for m in ordered if side is None or (m in SIDE_METHODS) == side]

    def rows(self, task: str, method: str) -> list[Row]:
        return [row for c in self.choices.get((task, method), []) for row in rows_of(c, self.info[task].main)]

    def row(self, task: str, method: str, pass_: str) -> Row | None:
        """The row of a method with one chosen setting (None when absent)."""
        choices = self.choices.get((task, method), [])
        if len(choices) != 1:
            return None
        return next((r for r in rows_of(choices[0], self.info[task].main) if r.pass_ == pass_), None)


# ------------------------------------------------------------------------------------------ derived from predictions
def prob_key(pass_: str, regression: bool) -> str:
    return {("single", False): "single_probs", ("ensemble", False): "ensemble_probs", ("single", True): "single",
            ("ensemble", True): "ensemble_mean"}[(pass_, regression)]


def arrays(run: Run, split: str, key: str) -> tuple[np.ndarray, np.ndarray, list] | None:
    """(predictions, labels, ids) of one split of a run, or None when not recorded."""
    preds = run.predictions(split)
    if not preds or preds.get(key) is None or preds.get("label") is None:
        return None
    return np.asarray(preds[key], dtype=np.float64), np.asarray(preds["label"]), list(preds.get("id") or [])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    from scipy.special import log_softmax

    return log_softmax(z, axis=1)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(log(p) / T) on (validation) predictions."""
    # scipy.optimize: a bounded one-dimensional search over log T (NLL is smooth and unimodal in it)
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(probs, 1e-12, 1.0))
    idx = np.arange(len(labels)), labels.astype(int)

    def nll(log_t: float) -> float:
        return float(-_log_softmax(logp / math.exp(log_t))[idx].mean())

    found = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(found.x))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    return np.exp(_log_softmax(np.log(np.clip(probs, 1e-12, 1.0)) / temperature))


def calibration(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    import torch

    return classification_calibration(torch.as_tensor(probs), torch.as_tensor(labels.astype(np.int64)))


def temperature_row(row: Row) -> Row | None:
    """Post-hoc temperature scaling of a classification row: one T per run fitted on its validation predictions,
    applied to its test predictions."""
    key = prob_key(row.pass_, False)
    per_run = []
    for run in row.choice.runs:
        validation, test = arrays(run, "validation", key), arrays(run, "test", key)
        if validation is None or test is None:
            continue
        t = fit_temperature(validation[0], validation[1])
        per_run.append({"T": t, **calibration(apply_temperature(test[0], t), test[1])})
    if not per_run:
        return None
    values = {k: Stat.of(v[k] for v in per_run) for k in per_run[0]}
    setting = f" [{local_text(row.choice.local)}]" if row.choice.local else ""
    return Row(f"{row.name}{setting} + temperature scaling", row.choice, row.pass_, values)


@dataclass
class DeepEnsemble:
    k: int
    n: int
    seeds: tuple[int, ...]
    values: dict[str, float]
    skipped: str | None = None  # why no ensemble was formed (values then empty)


def deep_ensemble(study: Study, task: str) -> DeepEnsemble | None:
    """Averaged test predictions (single pass) of the `lora` runs over the seeds at the chosen lr."""
    info = study.info[task]
    choices = study.choices.get((task, "lora"), [])
    if len(choices) != 1:
        return None
    key = prob_key("single", info.regression)
    members = []
    for run in choices[0].runs:
        found = arrays(run, "test", key)
        if found is not None:
            values, labels, ids = found
            members.append((run.seed, values, labels, ids or list(range(len(labels)))))
    if len(members) < 2:
        return None
    shared = set.intersection(*(set(m[3]) for m in members))
    order = [i for i in members[0][3] if i in shared]  # examples every member scored, in the first one's order
    if any(len(set(m[3])) != len(shared) for m in members):
        # a test split drawn per seed (QNLI and SQuAD here: dev split by the run's seed; or max_eval_samples): one
        # member's training examples can be another's test examples, so their average is no fair test score
        return DeepEnsemble(len(members), len(shared), tuple(m[0] for m in members), {}, skipped=(
            f"not formed: the `lora` seeds were tested on different examples (the test split or subset is drawn per "
            f"seed; {len(shared)} examples are common), so one member's training data holds another's test examples"))
    stacked, labels = [], None
    for _, values, y, ids in members:
        position = {i: n for n, i in enumerate(ids)}
        take = [position[i] for i in order]
        stacked.append(values[take])
        labels = y[take] if labels is None else labels
    mean = np.mean(stacked, axis=0)
    out = {"main": info.main_of(mean, labels)}
    if not info.regression:
        out.update(calibration(mean, labels))
    return DeepEnsemble(len(members), len(order), tuple(m[0] for m in members), out)


# ------------------------------------------------------------------------------------------------------- cost
def cost_frame(study: Study) -> pd.DataFrame:
    """Per task and method setting: mean train / eval seconds and peak memory over all its runs (every lr: the lr
    does not change the cost), and ratios to `lora` on the same task."""
    records = []
    for (task, method), choices in study.choices.items():
        for choice in choices:
            runs = [r for r in study.runs if r.task == task and r.method == method and r.local == choice.local]
            for run in runs:
                memory = run.result.get("peak_memory_mib") or {}
                cuda = number(memory.get("cuda"))
                records.append({"task": task, "method": method, "setting": local_text(choice.local),
                                "train_s": number(dig(run.metrics, "wall_time", "train_s")),
                                "eval_s": number(dig(run.metrics, "wall_time", "eval_s")),
                                "memory_mib": cuda if math.isfinite(cuda) else number(memory.get("rss")),
                                "memory_kind": "cuda" if math.isfinite(cuda) else "rss"})
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame.from_records(records)
    table = (frame.groupby(["task", "method", "setting"], sort=False)
             .agg(runs=("train_s", "size"), train_s=("train_s", "mean"), eval_s=("eval_s", "mean"),
                  memory_mib=("memory_mib", "mean"), memory_kind=("memory_kind", "first")).reset_index())
    base = table[table["method"] == "lora"].groupby("task")[["train_s", "memory_mib"]].mean()
    table["train_ratio"] = table["train_s"] / table["task"].map(base["train_s"])
    table["memory_ratio"] = table["memory_mib"] / table["task"].map(base["memory_mib"])
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    table["_order"] = table["method"].map(lambda m: (order.get(m, len(order)), m))
    return table.sort_values(["task", "_order", "setting"], kind="stable").drop(columns="_order")


__all__ = ["Choice", "Row", "Run", "Stat", "Study", "deep_ensemble", "fit_temperature", "temperature_row"]
