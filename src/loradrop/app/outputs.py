"""What a run shows and leaves beside its metrics: the console table (one format for ``train`` and ``eval``), the data
caveats, ``summary.md`` and the plots (loss curves labelled for what they measure, a reliability diagram with ECE and
bin counts, the ensemble's uncertainty histogram)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .plots import format_table, plot_histogram, plot_lines, plot_reliability

logger = logging.getLogger("loradrop.app")
N_BINS = 15


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (per-subject MMLU numbers left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if not k.startswith("accuracy_") or k == "accuracy_macro"}
        else:
            out[key] = value
    return out


def _flat(metrics: Mapping[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in headline(dict(metrics)).items() if not isinstance(v, dict)}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat[f"{key}.accuracy"] = value.get("accuracy")
    flat.pop("ensemble_size", None)
    return flat


def metrics_rows(single: Mapping[str, Any], ensemble: Mapping[str, Any] | None) -> tuple[list[dict], list[str]]:
    """(rows, columns) of the metrics table: one row for the single pass and one for the ensemble."""
    rows = [{"predictor": "single pass", **_flat(single)}]
    if ensemble is not None:
        rows.append({"predictor": f"ensemble of {ensemble.get('ensemble_size', '?')}", **_flat(ensemble)})
    columns = ["predictor"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    if "n" in columns:  # the example count last
        columns = [c for c in columns if c != "n"] + ["n"]
    return rows, columns


def metrics_table(single: Mapping[str, Any], ensemble: Mapping[str, Any] | None, *, markdown: bool = False) -> str:
    """The metrics as one rounded table (4 decimals)."""
    rows, columns = metrics_rows(single, ensemble)
    return format_table(rows, columns, markdown=markdown)


def print_metrics(task: str, split: str, single: Mapping[str, Any], ensemble: Mapping[str, Any] | None) -> None:
    """The console report of ``train`` and ``eval``: the task, the split, the rounded table."""
    print(f"\n{task}, {split} split:\n{metrics_table(single, ensemble)}", flush=True)


def data_caveats(metadata: Mapping[str, Any]) -> list[str]:
    """What a reader of the numbers must know about the data, from the task's metadata (``metrics.json: data``)."""
    caveats = []
    if metadata.get("note"):
        caveats.append(str(metadata["note"]))
    if metadata.get("derived_splits"):
        caveats.append(f"splits: {metadata['derived_splits']}")
    rows, full = metadata.get("rows") or {}, metadata.get("rows_before_subsampling") or {}
    cut = [f"{split} {n} of {full[split]}" for split, n in rows.items() if split in full and n < full[split]]
    if cut:
        caveats.append("subsampled: " + ", ".join(cut))
    if str(metadata.get("source", "")).startswith("hub:"):
        caveats.append(f"data from the hub ({metadata['source'][4:]})")
    return caveats


def settings_line(settings: Mapping[str, Any]) -> str:
    """The settings in one line (unset values, ``None``, ``False`` and empty ones, left out)."""
    return " ".join(f"{k}={v}" for k, v in settings.items()
                    if k != "command" and v is not None and v is not False and v not in ({}, "", []))


def write_summary(path: Path, *, title: str, settings: Mapping[str, Any], metadata: Mapping[str, Any], split: str,
                  single: Mapping[str, Any], ensemble: Mapping[str, Any] | None, plots: Sequence[str] = (),
                  extra: Sequence[str] = ()) -> Path:
    """``summary.md``: the settings in one line, the data caveats, the metrics table and the plots."""
    lines = [f"# {title}", "", f"Settings: `{settings_line(settings)}`", ""]
    if metadata.get("summary"):
        lines += [f"Data: {metadata['summary']}", ""]
    caveats = data_caveats(metadata)
    if caveats:
        lines += ["Data caveats:", *(f"- {c}" for c in caveats), ""]
    lines += [f"Metrics on the {split} split (4 decimals; ECE with {N_BINS} bins, top label):", "",
              metrics_table(single, ensemble, markdown=True), ""]
    lines += [*extra, *([""] if extra else [])]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_prediction_plots(folder: Path, rows: Sequence[Mapping[str, Any]], *, prefix: str = "",
                           title: str = "") -> list[str]:
    """Reliability diagram (classification rows: ``single_probs`` / ``ensemble_probs`` and an integer ``label``)
    and the ensemble's uncertainty histogram (rows with ``uncertainty.mutual_information``). Returns the files."""
    import math

    import torch

    written = []
    finite = all(math.isfinite(v) for r in rows for k in ("single_probs", "ensemble_probs") for v in r.get(k) or ())
    if not finite:
        logger.warning("loradrop: no reliability diagram: some predicted probabilities are not finite")
    if finite and rows and "single_probs" in rows[0] and all(isinstance(r.get("label"), int) for r in rows):
        labels = torch.tensor([r["label"] for r in rows])
        curves = {"single pass": (torch.tensor([r["single_probs"] for r in rows]), labels)}
        if rows[0].get("ensemble_probs") is not None:
            curves["ensemble"] = (torch.tensor([r["ensemble_probs"] for r in rows]), labels)
        name = f"{prefix}reliability.png"
        plot_reliability(curves, folder / name, N_BINS, counts=True,
                         title=f"Reliability{title}\n({N_BINS} bins, {len(rows)} examples)")
        written.append(name)
    mi = [r["uncertainty"]["mutual_information"] for r in rows
          if isinstance(r.get("uncertainty"), dict) and isinstance(r["uncertainty"].get("mutual_information"), float)
          and math.isfinite(r["uncertainty"]["mutual_information"])]
    if mi:
        name = f"{prefix}uncertainty.png"
        plot_histogram({"mutual information (epistemic)": mi}, folder / name, xlabel="nats per example",
                       title=f"Ensemble disagreement{title} ({len(mi)} examples)")
        written.append(name)
    return written


def _finite(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and math.isfinite(value)


def write_loss_plot(folder: Path, history: Mapping[str, Sequence[Mapping[str, float]]], *, masked: bool,
                    epochs: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """``loss_curves.png``: the training loss (with LoRA Dropout: the mean over the masked members, the objective)
    and the evaluation loss (the deterministic expected update, no masks), labelled as such, against the step."""
    train = [p for p in history.get("train", []) if _finite(p.get("loss"))]
    if not train:
        return []
    series: dict[str, dict[str, Any]] = {
        ("training loss: mean over the masked members" if masked else "training loss"): {
            "x": [p["step"] for p in train], "y": [p["loss"] for p in train], "style": "-", "color": "C0"}}
    evaluation = [p for p in history.get("eval", []) if _finite(p.get("loss"))]
    if evaluation:
        series["evaluation loss: " + ("expected update, no masks" if masked else "eval mode")] = {
            "x": [p["step"] for p in evaluation], "y": [p["loss"] for p in evaluation], "style": "--o",
            "color": "C1"}
    nll = [(e["step"], e["validation"]["single"].get("nll", e["validation"]["single"].get("span_nll"))) for e in epochs
           if isinstance(e.get("validation"), dict) and e["validation"].get("single")]
    if nll and all(_finite(v) for _, v in nll):
        series["validation NLL after each epoch (single pass" + (", expected update)" if masked else ")")] = {
            "x": [s for s, _ in nll], "y": [v for _, v in nll], "style": ":s", "color": "C2"}
    plot_lines(series, folder / "loss_curves.png", xlabel="optimizer step", ylabel="loss (nats)",
               title="Loss curves" + (" (training loss has masks, evaluation has none)" if masked else ""))
    return ["loss_curves.png"]


def write_run_outputs(folder: Path, metrics: Mapping[str, Any], *, predictions: str, history: Mapping[str, Any] | None,
                      masked: bool, prefix: str = "", title: str) -> list[str]:
    """Plots and ``{prefix}summary.md`` of a finished train (``prefix=""``) or eval (``prefix="eval_"``) run."""
    plots = []
    if history is not None:
        plots += write_loss_plot(folder, history, masked=masked, epochs=metrics.get("epochs") or ())
    split = metrics.get("eval_split", "evaluation")
    plots += write_prediction_plots(folder, _read_rows(folder / predictions), prefix=prefix,
                                    title=f" on the {split} split")
    extra = []
    if metrics.get("best_epoch"):
        best = metrics["best_epoch"]
        extra.append(f"Best epoch on validation ({best.get('metric')}): {best.get('epoch')} "
                     f"(value {best.get('value'):.4f})" if isinstance(best.get("value"), float) else "")
    if (metrics.get("early_stopping") or {}).get("stopped"):
        stop = metrics["early_stopping"]["stopped"]
        extra.append(f"Early stopping after epoch {stop['epoch']} (patience {stop['patience']}); the saved adapter is "
                     f"the best epoch's ({stop['best_epoch']})")
    args = (metrics.get("config") or {}).get("args") or {}
    write_summary(folder / f"{prefix}summary.md", title=title, settings=args, metadata=metrics.get("data") or {},
                  split=split, single=metrics["eval"]["single"], ensemble=metrics["eval"]["ensemble"], plots=plots,
                  extra=[e for e in extra if e])
    return [f"{prefix}summary.md", *plots]
