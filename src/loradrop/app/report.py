"""``loradrop report RESULTS_DIR... -o REPORT.md``: the study report of one or more sweeps, as Markdown and PNG plots.

Reads every ``*.json`` sweep result (schema ``loradrop.sweep.run/1``, status ok; ``*.failed.json`` only counted),
selects each method's learning rate (and `ld_1x`'s local axes) by validation over the common seeds
(`report_tables`), and writes: what was run, the selection protocol, per-task tables (final and best-epoch test
metrics, ECE/NLL/Brier, post-hoc temperature scaling, a deep ensemble of the LoRA seeds), the sensitivity and
strategy grids, acting on uncertainty (`report_uncertainty`: selective prediction, OOD detection and conformal
sets of runs trained with ``ood_task`` / ``conformal_alpha``), the commonsense (LLM) tables in the published
layout with the OOD tables, the published numbers in shape and risk-coverage (`report_commonsense`,
`report_risk`), plots (`report_plots`), the cost table, the claims table (`report_claims`) and the limitations.
The same results give the same Markdown (no timestamps; every order is sorted).
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..tasks import CATALOG
from .plots import format_table
from .report_claims import claims
from .report_commonsense import commonsense_report
from .report_mmlu import choice_scorings, is_mmlu_task, mmlu_report
from .report_plots import Figures, make_plots
from .report_tables import (
    METHOD_ORDER,
    SELECT_LOCAL,
    SIDE_METHODS,
    Row,
    Stat,
    Study,
    cost_frame,
    deep_ensemble,
    dig,
    fmt,
    local_text,
    number,
    sort_key,
    temperature_row,
)
from .report_uncertainty import uncertainty_report
from .results import SCHEMA, Loaded, load_results, model_labels


def write_report(results: Sequence[str | Path], output: str | Path, *,
                 plots_dir: str | Path | None = None, model_names: Mapping[str, str] | None = None) -> Path:
    """Write the study report of the sweep results in `results` (folders) to `output` (Markdown, written
    atomically) and its PNG plots to `plots_dir` (default ``<output stem>_plots/`` beside it); returns `output`.
    `model_names` maps a model as the runs recorded it (e.g. a local folder) to the name the tables show."""
    if isinstance(results, (str, Path)):
        results = [results]
    folders = [Path(r) for r in results]
    missing = [str(f) for f in folders if not f.is_dir()]
    if not folders or missing:
        raise UsageError(f"results folder(s) {missing or '(none given)'} do not exist")
    loaded = load_results(folders)
    if not loaded.runs:
        raise UsageError(f"no successful sweep results ({SCHEMA}) in {', '.join(map(str, folders))} "
                         f"({len(loaded.failed)} failed)")
    model_names = dict(model_names or {})
    recorded = model_labels(loaded.runs)  # as the runs recorded them (no names given)
    unknown = [m for m in model_names if m not in recorded]
    if unknown:
        raise UsageError(f"--model-name {unknown[0]}=...: no run recorded the model {unknown[0]!r}; the runs "
                         f"recorded: {', '.join(recorded)}")
    output = Path(output)
    plots = Path(plots_dir) if plots_dir is not None else output.parent / f"{output.stem}_plots"
    study = Study(loaded.runs)
    figures = make_plots(study, plots)
    command = ["loradrop", "report", *map(str, results), "-o", str(output)]
    if plots_dir is not None:
        command += ["--plots", str(plots_dir)]
    command += [f"--model-name={model}={name}" for model, name in model_names.items()]
    models = model_labels(study.runs, model_names)
    commonsense = commonsense_report(study, plots, output.parent, models)  # empty without commonsense tasks
    text = render(study, loaded, " ".join(shlex.quote(c) for c in command), figures, output.parent, commonsense,
                  models)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output)
    return output


def _table(rows: list[dict[str, str]], columns: list[str]) -> str:
    clean = [{k: str(v).replace("|", "\\|") for k, v in row.items()} for row in rows]
    return format_table(clean, columns, markdown=True)


def _distinct(values: Any) -> list[str]:
    unique = {json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v for v in values}
    return list(dict.fromkeys("none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
                              for v in sorted(unique, key=sort_key)))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def render(study: Study, loaded: Loaded, command: str, figures: Figures, base: Path,
           commonsense: Sequence[str], models: Sequence[str]) -> str:
    parts = [*_header(study, loaded, command), *_runs(loaded), *_selection(study), *commonsense, *_results(study),
             *_side_grids(study), *uncertainty_report(study), *_plots(figures, base), *_cost(study),
             *_claims(study), *_limitations(study, models)]
    return "\n".join(parts).rstrip() + "\n"


def _header(study: Study, loaded: Loaded, command: str) -> list[str]:
    runs = study.runs
    plans = _distinct(r.plan for r in runs)
    versions: dict[str, set] = {}
    for run in runs:
        for key, value in (run.result.get("versions") or {}).items():
            versions.setdefault(key, set()).add(str(value))
    hardware, wall = set(), {}
    for run in runs:
        hw = run.result.get("hardware") or {}
        device = str(hw.get("device", "?"))
        hardware.add(f"{hw.get('gpu')} x{hw.get('gpu_count', 1)} ({hw.get('gpu_memory_gib')} GiB), "
                     f"{hw.get('cpu_count')} CPU cores" if device == "cuda" else
                     f"CPU only, {hw.get('cpu_count')} cores, {hw.get('torch_threads')} torch threads")
        wall.setdefault(device, [0.0, 0])
        seconds = number(run.result.get("wall_time_s"))
        wall[device][0] += seconds if math.isfinite(seconds) else 0.0
        wall[device][1] += 1
    tasks = ", ".join(f"{t} ({study.info[t].kind}, main metric {study.info[t].main})" for t in study.tasks)
    found = {r.method for r in runs}
    methods = [m for m in METHOD_ORDER if m in found] + sorted(found - set(METHOD_ORDER))
    version_text = "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in sorted(versions.items()))
    scorings = choice_scorings(r for r in runs if study.info[r.task].kind == "causal_lm")
    scoring = ([f"- Multiple-choice scoring (causal LM tasks): {', '.join(scorings)} (`choice_scoring`: letter = "
                "the answer letter's next-token logit; cloze / cloze_mean = each choice's summed / mean token "
                "log-likelihood)"] if scorings else [])
    return [
        f"# LoRA Dropout study report: {', '.join(plans)}", "",
        f"Regenerate: `{command}`", "",
        "## What was run", "",
        f"- Plans: {', '.join(plans)}",
        f"- Runs: {len(runs)} ok, {len(loaded.failed)} failed",
        f"- Tasks: {tasks}",
        f"- Methods: {', '.join(methods)}",
        *scoring,
        f"- Versions: {version_text}",
        f"- Hardware: {'; '.join(sorted(hardware))}",
        "- Sum of the runs' wall times (runs that shared a machine overlap): " + "; ".join(
            f"{'GPU' if d == 'cuda' else d.upper()} {_hours(s)} over {n} runs" for d, (s, n) in sorted(wall.items())),
        "- Main metrics and ECE are shown x100 (points, %), NLL and Brier as they are; mean ± std over seeds.",
        "",
    ]


def _runs(loaded: Loaded) -> list[str]:
    failed_per = {}
    for f in loaded.failed:
        failed_per[f["folder"]] = failed_per.get(f["folder"], 0) + 1
    rows = [{"results folder": folder, "ok": str(n), "failed": str(failed_per.get(folder, 0))}
            for folder, n in sorted(loaded.ok_per_folder.items())]
    out = ["## Runs", "", _table(rows, ["results folder", "ok", "failed"]), ""]
    if loaded.failed:
        out += [f"Failed runs ({len(loaded.failed)}, not reported):", ""]
        out += [f"- `{f['run_id']}`: {f['error']}" for f in sorted(loaded.failed, key=lambda f: str(f["run_id"]))]
        out.append("")
    if loaded.ignored or loaded.duplicates:
        out += [f"Left aside: {len(loaded.ignored)} JSON file(s) that are not sweep results, "
                f"{len(loaded.duplicates)} duplicate result(s) of a run already read.", ""]
    return out


PROTOCOL = (
    "For each task, method and setting of the method's other local axes, the learning rate is chosen by the "
    "validation main metric of the best epoch (`best_epoch`: the single pass scored on the validation split held "
    "out of train after every epoch; the final model's validation score where a run has no per-epoch evaluation), "
    "averaged over the seeds present at every learning-rate candidate (the common seeds). For `ld_1x` the "
    "method-local axes (p, mask scope, rescale, ...) are chosen the same way, jointly with the learning rate. Then "
    "ALL seeds at the chosen setting are reported: mean ± sample standard deviation (ddof=1) over seeds, with n. "
    "Test numbers take no part in any choice. `ld_sens` and `ld_strategy` keep every local setting (each with its "
    "own chosen learning rate).")


def _selection(study: Study) -> list[str]:
    rows = []
    for task in study.tasks:
        for method in study.methods(task, side=None):
            for c in study.choices[(task, method)]:
                candidates = "; ".join(
                    f"{local_text(local) + ', ' if local and method in SELECT_LOCAL else ''}lr {lr:g}: "
                    + ("–" if score != score else f"{score:.4f}" if study.info[task].main == "loss"  # SFT loss
                       else f"{score * 100:.2f}") for local, lr, score in c.candidates)
                chosen = f"lr {c.lr:g}" + (f", {local_text(c.local)}" if c.local else "")
                rows.append({"task": task, "method": method, "validation score per candidate": candidates,
                             "chosen": chosen, "common seeds": ",".join(map(str, c.common_seeds)) or "none",
                             "seeds reported": ",".join(map(str, c.seeds)), "note": c.note})
    columns = ["task", "method", "validation score per candidate", "chosen", "common seeds", "seeds reported", "note"]
    return ["## Selection protocol", "", PROTOCOL, "", _table(rows, columns), ""]


def _row_cells(row: Row, main: str, regression: bool) -> dict[str, str]:
    cells = {"row": row.name, "lr": f"{row.choice.lr:g}", "setting": local_text(row.choice.local) or "–",
             f"test {main} (final)": fmt(row.values["main"], "main"),
             f"test {main} (best-val epoch)": fmt(row.values["best"], "best"), "n seeds": str(row.values["main"].n)}
    if "em" in row.values:
        cells["test exact_match (final)"] = fmt(row.values["em"], "main")
    if not regression:
        cells.update({"ECE (%)": fmt(row.values["ece"], "ece"), "NLL": fmt(row.values["nll"], "nll"),
                      "Brier": fmt(row.values["brier"], "brier")})
    return cells


def _columns(main: str, regression: bool, rows: Sequence[Row] = ()) -> list[str]:
    calibration = [] if regression else ["ECE (%)", "NLL", "Brier"]
    em = ["test exact_match (final)"] if any("em" in r.values for r in rows) else []
    return ["row", "lr", "setting", f"test {main} (final)", f"test {main} (best-val epoch)", *em, *calibration,
            "n seeds"]


DERIVED_TEXT = (
    "Derived from the predictions ({task}): temperature scaling fits one T per run on its validation predictions "
    "(minimising the NLL of softmax(log p / T)) and applies it to its test predictions (the argmax, so the main "
    "metric, is unchanged); the deep ensemble averages the test probabilities (regression: values) of the `lora` runs "
    "over the seeds at the chosen lr: one number, no std.")


def _derived_cells(name: str, values: dict[str, Stat], main: Stat, n: str, regression: bool,
                   main_name: str) -> dict[str, str]:
    cells = {"derived row": name, "T": fmt(values.get("T"), "T"), f"test {main_name}": fmt(main, "main"), "n": n}
    if not regression:  # (test accuracy is recomputed from the predictions; the main metric column is omitted then)
        cells.update({"accuracy": fmt(values["accuracy"], "accuracy"), "ECE (%)": fmt(values["ece"], "ece"),
                      "NLL": fmt(values["nll"], "nll"), "Brier": fmt(values["brier"], "brier")})
    return cells


def _derived(study: Study, task: str, rows: list[Row]) -> list[str]:
    info = study.info[task]
    derived = []
    for row in [] if info.regression else rows:
        scaled = temperature_row(row)
        if scaled is not None:
            derived.append(_derived_cells(scaled.name, scaled.values, row.values["main"], str(scaled.values["T"].n),
                                          False, info.main))
    ens = deep_ensemble(study, task)
    skipped = [] if ens is None or ens.skipped is None else [f"Deep ensemble of k={ens.k} LoRAs: {ens.skipped}.", ""]
    if ens is not None and ens.skipped is None:
        one = {k: Stat.of([v]) for k, v in ens.values.items()}
        name = f"Deep ensemble of k={ens.k} LoRAs (seeds {','.join(map(str, ens.seeds))}, {ens.n} test examples)"
        derived.append(_derived_cells(name, one, one["main"], "1 ensemble", info.regression, info.main))
    if not derived:
        return skipped
    columns = ["derived row", "T", *([] if info.main == "accuracy" else [f"test {info.main}"]),
               *([] if info.regression else ["accuracy", "ECE (%)", "NLL", "Brier"]), "n"]
    return [DERIVED_TEXT.format(task=task), "", _table(derived, columns), "", *skipped]


def _results(study: Study) -> list[str]:
    if all(is_mmlu_task(study, task) for task in study.tasks):  # SFT only: MMLU is the whole result
        return mmlu_report(study)
    out = ["## Results per task", "",
           "Rows: each method's single pass and its test-time ensemble at the chosen setting. Final: the model at the "
           "end of training; best-val epoch: the test score of the epoch with the best validation main metric.", ""]
    for task in study.tasks:
        if is_mmlu_task(study, task):  # SFT runs: no test loss; their MMLU scores have their own section
            continue
        info = study.info[task]
        rows = [row for m in study.methods(task) for row in study.rows(task, m)]
        table = _table([_row_cells(r, info.main, info.regression) for r in rows],
                       _columns(info.main, info.regression, rows))
        out += [f"### {task} (main metric: {info.main})", "", table, "", *_derived(study, task, rows)]
    return [*out, *mmlu_report(study)]


def _side_grids(study: Study) -> list[str]:
    out = []
    for method, title in zip(SIDE_METHODS, ("Sensitivity grid (`ld_sens`: p x samples)",
                                            "Masking strategies (`ld_strategy`)")):
        for task in study.tasks:
            if (task, method) not in study.choices:
                continue
            info = study.info[task]
            rows = study.rows(task, method)
            out += [f"### {title} on {task}", "",
                    _table([_row_cells(r, info.main, info.regression) for r in rows], _columns(info.main,
                                                                                             info.regression)), ""]
    return ["## Sensitivity and strategies", "", *out] if out else []


def _plots(figures: Figures, base: Path) -> list[str]:
    titles = {"reliability": "Reliability diagrams", "ece": "ECE over training", "loss": "Train vs validation loss",
              "sensitivity": "Sensitivity (ld_sens)", "strategies": "Strategies (ld_strategy)"}
    out = ["## Plots", ""]
    for section, made in figures.items():
        if made:
            out += [f"### {titles[section]}", ""]
            out += [f"![{caption}]({Path(os.path.relpath(path, base)).as_posix()})  \n*{caption}*\n"
                    for caption, path in made]
    if len(out) == 2:
        out += ["No plot: the runs have neither predictions nor per-epoch metrics.", ""]
    return out


def _cost(study: Study) -> list[str]:
    table = cost_frame(study)
    rows = []
    for rec in table.to_dict("records"):
        rows.append({"task": rec["task"], "method": rec["method"], "setting": rec["setting"] or "–",
                     "runs": str(rec["runs"]), "train (s)": f"{rec['train_s']:.1f}", "eval (s)": f"{rec['eval_s']:.1f}",
                     "peak memory (MiB)": f"{rec['memory_mib']:.0f} ({rec['memory_kind']})",
                     "train time / LoRA": f"{rec['train_ratio']:.2f}x" if rec["train_ratio"] == rec["train_ratio"]
                     else "–",
                     "memory / LoRA": f"{rec['memory_ratio']:.2f}x" if rec["memory_ratio"] == rec["memory_ratio"]
                     else "–"})
    columns = ["task", "method", "setting", "runs", "train (s)", "eval (s)", "peak memory (MiB)", "train time / LoRA",
               "memory / LoRA"]
    return ["## Cost", "", "Mean over every run of the setting (all learning rates and seeds: the lr does not change "
            "the cost); peak memory is the GPU's allocated peak (cuda) or the process's peak RSS on CPU; ratios to "
            "`lora` on the same task.", "", _table(rows, columns), ""]


def _claims(study: Study) -> list[str]:
    rows = [{"claim": f"{c.cid}: {c.claim}", "paper": c.paper, "ours": c.ours, "verdict": c.verdict, "why": c.why}
            for c in claims(study)]
    return ["## Claims", "",
            "Verdict: diff = ours(A) − ours(B) over seeds, SE = sqrt(s_A²/n_A + s_B²/n_B); agree when diff has the "
            "paper's sign and exceeds one SE, disagree when it has the opposite sign and exceeds one SE, unclear "
            "otherwise; not run when the runs are missing. Averages over tasks: the mean of the per-task differences, "
            "SE = sqrt(sum SE²)/T. C10 (a \"matches\" claim) agrees unless 1x is worse by more than one SE. LD = "
            "`ld_paper`; main metrics in points.", "",
            _table(rows, ["claim", "paper", "ours", "verdict", "why"]), ""]


_ABSENT = object()


def _limitations(study: Study, model_list: Sequence[str]) -> list[str]:
    runs = study.runs

    def setting(key: str) -> str:  # from the run's full settings (config.args), else the plan's; a Laplace fit's
        # result records the fit's settings, not its LoRA run's training, so it is left out (its LoRA run is counted)
        values = [(dig(r.metrics, "config", "args") or r.settings).get(key, _ABSENT) for r in runs
                  if r.method != "laplace"]
        return "/".join(_distinct(v for v in values if v is not _ABSENT)) or "–"

    models = "/".join(model_list)
    data = []
    for task in study.tasks:  # the split sizes of the task's first run (they vary little between seeds)
        meta = next(r.metrics.get("data") or {} for r in runs if r.task == task)
        rows = ", ".join(f"{k} {v}" for k, v in sorted((meta.get("rows") or {}).items()))
        full = dig(meta, "rows_before_subsampling", "train")
        test = dig(meta, "split_notes", "test")
        if rows:
            data.append(f"{task} {rows}" + (f" (of {full} train rows)" if full else "")
                        + (f", test = {test}" if test else ""))
    seeds = _distinct(r.seed for r in runs)
    reported = [len(c.runs) for cs in study.choices.values() for c in cs]
    holdout = setting("holdout_fraction")
    glue = [t for t in study.tasks if t in CATALOG and CATALOG[t].family == "glue"]
    scope = (f"the paper: DeBERTaV3-base); {len(study.tasks)} task(s) ({', '.join(study.tasks)}), "
             f"{len(glue)} of them of the paper's 8 GLUE tasks" if glue else
             f"the paper's GLUE study: DeBERTaV3-base, its LLM claim: LLaMA2-7B); {len(study.tasks)} task(s) "
             f"({', '.join(study.tasks)}), none of them the paper's")
    text = (f"**Limitations.** Model: {models} ({scope}; max_train_samples {setting('max_train_samples')}"
            f", max_eval_samples {setting('max_eval_samples')}; validation: holdout_fraction {holdout} of train"
            f"{', with the GLUE dev split scored as test' if glue and holdout != '–' else ''}; "
            f"epochs {setting('epochs')}, "
            f"max_seq_len {setting('max_seq_len')}, r {setting('r')}; {len(seeds)} seed(s) ({', '.join(seeds)}), "
            f"{min(reported)}{'' if min(reported) == max(reported) else f'–{max(reported)}'} reported per setting.")
    if data:
        text += f" Data: {'; '.join(data)}."
    return ["## Limitations", "", text, ""]


__all__ = ["load_results", "write_report"]
