"""The ``loradrop`` command line: demo, train, eval, sweep, report, tasks.

Flags are parsed into the typed settings of `loradrop.app` (one flag per field) and the command runs through the same
Python entry points a script would call. Errors from bad input (`loradrop.errors.LoradropError`) print one line on
stderr and exit with status 2, leaving no partial output folder; any other exception is a bug and keeps its traceback.

Building the parser imports neither torch, transformers, PEFT nor ``datasets`` (the ``--task`` choices come from the
registry's catalog), so ``--help`` and argument errors answer at once; a command loads them when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import MASK_SCOPES, STRATEGIES
from .errors import LoradropError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _gpu_list(text: str) -> list[int]:
    """``0,1,3`` -> [0, 1, 3]: GPU indices for `sweep --gpus`."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1,2, got {text!r}")
    return [int(p) for p in parts]


def _model_name(text: str) -> tuple[str, str]:
    """``RECORDED=NAME`` of ``loradrop report --model-name``: both sides non-empty, taken as they are."""
    recorded, sep, name = text.partition("=")
    if not sep or not recorded.strip() or not name.strip():
        raise argparse.ArgumentTypeError(f"expected RECORDED=NAME (e.g. /tmp/gpu/smol=SmolLM2-135M-Instruct), "
                                         f"got {text!r}")
    return recorded.strip(), name.strip()


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value parsed as YAML (``true``, ``0.1``, ``1e-3``, ``[a, b]``, ``{k: v}``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{key}: the value {raw!r} is not valid YAML ({err})") from err
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip(), value


def _add_training_controls(train: argparse.ArgumentParser) -> None:
    from .app.settings import ATTN_IMPLEMENTATIONS, CHOICE_SCORINGS, LR_SCHEDULERS

    group = train.add_argument_group("training controls (transformers' TrainingArguments)")
    warmup = group.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-steps", type=int, default=0, help="linear warmup over this many optimizer steps")
    warmup.add_argument("--warmup-ratio", type=float, default=0.0, help="linear warmup over this share of the steps")
    group.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="linear", help="learning-rate schedule")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    group.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1,
                       help="micro-batches per optimizer step (effective batch: batch size x this x processes)")
    precision = group.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU, or recent CPUs)")
    precision.add_argument("--fp16", action="store_true", help="fp16 mixed precision with loss scaling (GPU)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in backward (less memory, about 30%% more time)")
    group.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default=None,
                       help="transformers' attention backend (default: transformers' choice, sdpa)")
    group.add_argument("--choice-scoring", choices=CHOICE_SCORINGS, default="letter",
                       help="multiple-choice tasks with a causal LM: score the answer letter (default) or each "
                            "choice's log-likelihood, summed (cloze) or per token (cloze_mean): for models too small "
                            "to answer by letter")
    group.add_argument("--report-to", default="none", metavar="NAMES",
                       help="logging integrations, comma-separated: tensorboard (logs in the run folder's runs/), "
                            "wandb, mlflow, ... or 'none'")
    group.add_argument("--early-stopping-patience", type=_positive_int, default=None, metavar="N",
                       help="with --epoch-eval: stop after N epochs without a better validation score")
    group.add_argument("--trainer-arg", dest="trainer_args", type=_key_value, action="append", default=None,
                       metavar="KEY=VALUE", help="any other TrainingArguments field (value parsed as YAML, e.g. "
                       "--trainer-arg max_grad_norm=0.5); repeatable; unknown names are refused")


def _add_lora_dropout_args(parser: argparse.ArgumentParser, *, p: float, samples: int) -> None:
    group = parser.add_argument_group("LoRA Dropout")
    group.add_argument("--p", type=float, default=p, help="drop probability of input/output features, in [0, 1)")
    group.add_argument("--samples", type=_positive_int, default=samples,
                       help="masks per training step (the loss is their mean); run in one batched call")
    group.add_argument("--strategy", choices=STRATEGIES, default="ab", help="what is masked (see README)")
    group.add_argument("--mask-scope", choices=MASK_SCOPES, default="batch",
                       help="one mask per member ('batch', the paper) or per example")
    group.add_argument("--rescale", action="store_true", help="scale kept entries by 1/(1-p) (the paper does not)")
    group.add_argument("--ensemble", type=int, default=8, help="test-time ensemble size (0: single pass only)")
    group.add_argument("--chunk-size", type=_positive_int, default=None,
                       help="members per forward call: bounds memory of --samples in training (same result, "
                            "one backward per chunk) and of the test-time ensemble")


def _add_acting_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("acting on uncertainty (the 'uncertainty' section of the metrics, plots)")
    group.add_argument("--ood-task", default=None, metavar="TASK[,TASK...]",
                       help="tasks scored as out-of-distribution sets (OOD AUROC/AUPR/FPR@95): classification tasks "
                            "for a classification run; for a commonsense run other commonsense tasks, each also "
                            "scored in full (accuracy, ECE, NLL, Brier), e.g. arc_challenge,mmlu_college_physics")
    group.add_argument("--conformal-alpha", type=float, default=None, metavar="A",
                       help="split-conformal LAC/APS sets at miscoverage A (calibrated on the run's validation "
                            "split, else on a held-out half of the evaluation split)")


def build_parser() -> argparse.ArgumentParser:
    from .tasks import trainable_task_names

    tasks = trainable_task_names()
    parser = argparse.ArgumentParser(prog="loradrop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline showcase: MiniLM on tweets, LoRA (overfitting) vs LoRA Dropout")
    demo.add_argument("--output", default="runs/demo", help="folder for metrics.json, plots and adapters")
    demo.add_argument("--train-samples", type=_positive_int, default=300)
    demo.add_argument("--eval-samples", type=_positive_int, default=200, help="validation and test tweets (each)")
    demo.add_argument("--epochs", type=float, default=10.0)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--batch-size", type=_positive_int, default=32)
    demo.add_argument("--max-seq-len", type=_positive_int, default=48)
    demo.add_argument("--r", type=_positive_int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_lora_dropout_args(demo, p=0.5, samples=2)

    train = sub.add_parser("train", help="fine-tune on a task and evaluate single pass and ensemble")
    train.add_argument("--task", required=True, choices=tasks,
                       help="a registered task ('instruct': Alpaca, or LIMA when --data-dir is a LIMA file)")
    train.add_argument("--model", default=None, help="local folder or hub id (default: offline MiniLM / SmolLM2)")
    train.add_argument("--data-dir", default=None, help="GLUE-layout folder, SQuAD json folder, Alpaca json, or "
                       "a hub dataset name")
    train.add_argument("--method", choices=("lora", "adalora"), default="lora")
    train.add_argument("--r", type=_positive_int, default=8)
    train.add_argument("--alpha", type=float, default=16)
    train.add_argument("--target-modules", default=None, help="comma-separated module names (default: per model)")
    train.add_argument("--no-lora-dropout", action="store_true", help="plain LoRA baseline (p ignored)")
    train.add_argument("--peft-dropout", type=float, default=0.0,
                       help="PEFT's element-wise lora_dropout on the LoRA input (a baseline; 0: off)")
    _add_lora_dropout_args(train, p=0.5, samples=1)
    train.add_argument("--test-ensemble", choices=("auto", "mc_dropout", "masks", "none"), default="auto",
                       help="test-time ensemble: auto (LoRA Dropout's members), mc_dropout (PEFT dropout on at test), "
                            "masks (LoRA Dropout masks at test only, for a baseline), none")
    train.add_argument("--epochs", type=float, default=3.0)
    train.add_argument("--max-steps", type=int, default=-1)
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--batch-size", type=_positive_int, default=32)
    train.add_argument("--max-seq-len", type=_positive_int, default=128)
    train.add_argument("--max-train-samples", type=_positive_int, default=None)
    train.add_argument("--max-eval-samples", type=_positive_int, default=None)
    train.add_argument("--save-steps", type=_positive_int, default=None, help="checkpoint every K steps")
    train.add_argument("--eval-steps", type=_positive_int, default=None, help="eval loss every K steps")
    train.add_argument("--holdout-fraction", type=float, default=None,
                       help="carve a validation split out of train (model selection); score on the dev split")
    train.add_argument("--skip-nonfinite-steps", action="store_true",
                       help="skip steps with a NaN/inf loss or gradient (default: stop the run with an error)")
    train.add_argument("--epoch-eval", action="store_true",
                       help="score validation and test after every epoch (metrics.json: epochs, best_epoch)")
    _add_training_controls(train)
    _add_acting_args(train)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output", required=True, help="run folder (metrics.json, adapter, predictions, logs)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")

    ev = sub.add_parser("eval", help="re-evaluate a saved run's adapter")
    ev.add_argument("--adapter", required=True, help="adapter folder written by train (or a run folder)")
    ev.add_argument("--task", choices=tasks, default=None, help="default: the task the run was trained on")
    ev.add_argument("--data-dir", default=None)
    ev.add_argument("--model", default=None, help="default: the base model recorded in the run")
    ev.add_argument("--ensemble", type=int, default=8)
    ev.add_argument("--chunk-size", type=_positive_int, default=None)
    ev.add_argument("--batch-size", type=_positive_int, default=None,
                    help="default: the run's batch size (ensemble members are drawn per batch)")
    ev.add_argument("--max-seq-len", type=_positive_int, default=None)
    ev.add_argument("--max-eval-samples", type=_positive_int, default=None)
    from .app.settings import ATTN_IMPLEMENTATIONS, CHOICE_SCORINGS

    ev.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default=None,
                    help="transformers' attention backend (default: the run's)")
    ev.add_argument("--choice-scoring", choices=CHOICE_SCORINGS, default=None,
                    help="letter or cloze scoring of multiple-choice tasks (default: the run's)")
    ev.add_argument("--seed", type=int, default=None, help="ensemble seed (default: the run's seed)")
    ev.add_argument("--output", default=None, help="where to write eval_metrics.json (default: beside the adapter)")
    from .app.settings import LAPLACE_PRIORS

    ev.add_argument("--laplace", nargs="?", const="auto", default=None, choices=LAPLACE_PRIORS,
                    help="score the Laplace-LoRA baseline instead (needs laplace-torch): KFAC Laplace over a plain "
                         "LoRA run's factors, prior tuned by validation NLL (auto: when a validation split exists) "
                         "or marginal likelihood; the ensemble row is its linearised predictive")
    _add_acting_args(ev)
    sweep = sub.add_parser("sweep", help="run a grid of training runs from a YAML plan (one JSON result per run)")
    sweep.add_argument("plan", help="the plan file (see loradrop.app.sweep)")
    sweep.add_argument("--results", default=None, help="results folder (default: the plan's 'results')")
    sweep.add_argument("--workers", type=_positive_int, default=1,
                       help="runs trained at once in separate processes (several small runs can share one GPU)")
    sweep.add_argument("--gpus", type=_gpu_list, default=None, metavar="0,1,...",
                       help="spread the workers over these GPUs, round robin (default: every worker sees all)")
    sweep.add_argument("--gpu-memory", type=_positive_float, default=None, metavar="GIB",
                       help="each GPU's memory budget: a run starts once its estimated peak (measured on the finished "
                            "runs of its task and method) fits beside the running ones (loradrop.app.sweep_schedule)")
    sweep.add_argument("--gpu-gate", default=None, metavar="FILE",
                       help="share the --gpu-memory budget with every other sweep on this machine given the same FILE "
                            "(created if missing): their runs' reservations add up against one budget per GPU")
    sweep.add_argument("--checkpoint-steps", type=_positive_int, default=None, metavar="N",
                       help="every run saves a checkpoint each N steps, and a run interrupted earlier (its folder "
                            "still in --work-dir) continues from its last one instead of starting over")
    sweep.add_argument("--deadline", type=_positive_float, default=None, metavar="SECONDS",
                       help="start a run only if it is expected (from the finished runs of its task and method) to "
                            "end within SECONDS from now; the others stay pending, listed as deferred (e.g. the "
                            "device time left on a lent GPU)")
    sweep.add_argument("--work-dir", default=None, help="where run folders are built (default: beside --results)")
    sweep.add_argument("--keep-runs", action="store_true", help="keep each run folder (adapters, logs)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs to do and stop")
    sweep.add_argument("--only", action="append", default=[], metavar="PATTERN",
                       help="run only the runs whose id matches this glob (e.g. 'mrpc__*'); repeatable")
    sweep.add_argument("--settled-only", action="store_true",
                       help="a phase 2 (select_from naming phase 1's plan): run the task/methods whose phase-1 runs "
                            "are all done and none failed, and list the others as waiting instead of refusing the plan")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting of every run (e.g. --set model=/path/to/minilm); repeatable")
    sweep.add_argument("--laplace", nargs="?", const="auto", default=None, choices=LAPLACE_PRIORS,
                       help="score Laplace-LoRA on every run of method 'lora': right after it trains, in its worker, "
                            "first on every kept lora run folder without a Laplace result (a fit cut off earlier), "
                            "and afterwards on those whose fit failed (needs "
                            "laplace-torch): one result of method 'laplace' each (loradrop.app.laplace_sweep)")

    tasks_cmd = sub.add_parser("tasks", help="list the registered tasks, their metrics and whether their data is here")
    tasks_cmd.add_argument("--data-dir", default=None,
                           help="data root to look in (default: $LORADROP_DATA_DIR, else ../shared/data)")
    tasks_cmd.add_argument("--json", action="store_true", help="print the listing as JSON")

    report = sub.add_parser("report", help="tables, plots and the claims table from sweep results")
    report.add_argument("results", nargs="+", help="results folders written by loradrop sweep")
    report.add_argument("-o", "--output", default="REPORT.md", help="the Markdown report to write")
    report.add_argument("--plots", default=None, help="folder for the PNG plots (default: beside the report)")
    report.add_argument("--model-name", action="append", default=[], type=_model_name, metavar="RECORDED=NAME",
                        help="show a model the runs recorded (e.g. a local folder) under NAME in the tables, e.g. "
                             "/tmp/gpu/smol=SmolLM2-135M-Instruct; repeatable")
    return parser


def _sweep(args: argparse.Namespace) -> int:
    from .app.sweep import SweepPlan, parse_overrides, pending, run_sweep

    # --only first: a phase 2 can run the tasks phase 1 finished (--settled-only: every task/method it finished)
    plan = SweepPlan.load(args.plan, only=args.only, settled_only=args.settled_only)
    if args.set:
        plan.overrides = parse_overrides(args.set)
        plan.runs()  # validate the overridden settings before anything runs
    for (task, method), why in plan.waiting.items():
        print(f"waiting for phase 1: {task}/{method} ({why})", flush=True)
    results = Path(args.results) if args.results else plan.results
    if args.dry_run:
        todo, done = pending(plan, results) if results is not None else (plan.runs(), 0)
        for run in todo:
            print(run.run_id)
        print(f"{len(todo)} to run, {done} done already", flush=True)
        if args.laplace is not None and results is not None and results.is_dir():
            from .app.laplace_sweep import SOURCE_METHOD, plan_laplace, unfitted_at_lora_choice

            lap = plan_laplace(results, args.work_dir, only=args.only)
            for job in lap.todo:
                print(job.run_id)
            print(f"laplace: {len(lap.todo)} to run, {len(lap.done)} done already, {len(lap.missing)} without a "
                  "kept run folder (runs still to train are scored after training)", flush=True)
            # from the whole plan: --only narrows what runs, not which tasks' LoRA grids are complete
            whole = todo
            if args.only:
                with contextlib.suppress(LoradropError):  # a phase 2 refused whole (select_from): what --only left
                    whole = pending(SweepPlan.load(args.plan, settled_only=args.settled_only), results)[0]
            unsettled = {str(run.settings.get("task")) for run in whole if run.method == SOURCE_METHOD}
            unsettled |= {task for task, method in plan.waiting if method == SOURCE_METHOD}
            if lap.missing and (needed := unfitted_at_lora_choice(results, lap.missing, unsettled)):
                print(f"laplace: {len(needed)} of those at LoRA's chosen setting, which the report's Laplace-LoRA "
                      f"row needs (delete their results to train them again with their fits): {', '.join(needed)}",
                      flush=True)
        return 0
    if args.laplace is not None:
        from .app.laplace_baseline import require_laplace
        from .app.laplace_sweep import SOURCE_METHOD
        from .errors import UsageError

        if SOURCE_METHOD not in plan.methods:
            raise UsageError(f"--laplace scores the plan's plain-LoRA runs: plan {plan.name!r} has no method "
                             f"{SOURCE_METHOD!r} (its methods: {sorted(plan.methods)})")
        require_laplace()  # before any training
    summary = run_sweep(plan, results, workers=args.workers, work_dir=args.work_dir, keep_runs=args.keep_runs,
                        gpus=args.gpus, gpu_memory_gib=args.gpu_memory, checkpoint_steps=args.checkpoint_steps,
                        laplace=args.laplace, deadline_s=args.deadline, gpu_gate=args.gpu_gate)
    deferred = summary.get("deferred") or []
    print(f"sweep {plan.name}: {summary['ok']} ran, {summary['skipped']} done already, {len(summary['failed'])} "
          f"failed, {len(deferred)} deferred (of {summary['planned']})"
          + (f"; {summary['laplace_ok']} earlier runs' Laplace fits done" if summary.get("laplace_ok") else ""),
          flush=True)
    for run_id in deferred:
        print(f"  deferred: {run_id} (expected to end after the deadline; still pending)", file=sys.stderr)
    for failure in summary["failed"]:
        print(f"  failed: {failure['run_id']}: {failure['error']}", file=sys.stderr)
    for failure in summary.get("laplace_failed", []):
        print(f"  laplace failed after {failure['run_id']}: {failure['error']}", file=sys.stderr)
    failed = bool(summary["failed"] or summary.get("laplace_failed"))
    if args.laplace is not None and deferred:  # the fits left wait for the next sweep, which puts them first
        print(f"laplace {plan.name}: no pass after the sweep (runs were deferred by --deadline); the next sweep fits "
              "the kept LoRA runs first", flush=True)
    elif args.laplace is not None:
        from .app.laplace_sweep import laplace_sweep

        if args.gpus:  # the Laplace fits run in this process: on the first of the sweep's GPUs
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpus[0])

        with _whole_shared_gate(args):  # fits retried here (often after running out of memory in a worker)
            done = laplace_sweep(results or plan.results, args.work_dir, prior=args.laplace, only=args.only,
                                 overrides=plan.overrides)
        print(f"laplace {plan.name}: {done['ok']} ran, {done['skipped']} done already, {len(done['failed'])} failed, "
              f"{len(done['missing'])} without a kept run folder (of {done['planned'] + len(done['missing'])})",
              flush=True)
        for failure in done["failed"]:
            print(f"  failed: {failure['run_id']}: {failure['error']}", file=sys.stderr)
        for run_id in done["missing"]:
            print(f"  no run folder (trained earlier without --laplace or --keep-runs; train it again): {run_id}",
                  file=sys.stderr)
        failed = failed or bool(done["failed"] or done["missing"])
    return 1 if failed else 0


def _tasks(args: argparse.Namespace) -> int:
    from .app.catalog import format_tasks, list_tasks

    listing = list_tasks(args.data_dir)
    if args.json:
        import json

        print(json.dumps(listing, indent=2))
    else:
        print(format_tasks(listing))
    return 0


def settings_from_args(args: argparse.Namespace):
    """The typed settings of a parsed ``demo`` / ``train`` / ``eval`` command line (validated; raises
    `SettingsError`)."""
    from .app import DemoSettings, EvalSettings, TrainSettings

    cls = {"demo": DemoSettings, "train": TrainSettings, "eval": EvalSettings}[args.command]
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if "trainer_args" in values:
        values["trainer_args"] = dict(values["trainer_args"] or ())
    return cls(**values)


def _quiet_libraries() -> None:
    """Keep the terminal for our progress bars and results: no load reports or deprecation chatter."""
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars: errors stay one line on stderr
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _close_progress_bars() -> None:
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


def _end_replica() -> None:
    """Under torchrun, a replica rank (`train` returned no metrics: rank 0 evaluates and writes) ends here.

    It leaves with `os._exit(0)` after flushing its output: at normal interpreter teardown a replica has aborted with
    "terminate called without an active exception" (a C++ thread of torch.distributed destroyed while joinable, seen
    on a loaded 2-core machine), which torchrun reports as a failed run and answers by killing rank 0 mid-evaluation.
    A replica has nothing left to write; its process group is already closed (train_run._leave_process_group).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _whole_shared_gate(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """With --gpu-gate, the whole budget of the sweep's first GPU reserved in the shared gate (the other sweeps' runs
    wait while this process fits); else nothing to hold."""
    from .app.sweep import shared_gate

    gate = shared_gate(args.gpu_gate, args.gpu_memory)  # (validated already by the sweep before it)
    return contextlib.nullcontext() if gate is None else gate.reserve((args.gpus or [0])[0], gate.budget)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sweep":
            _quiet_libraries()
            return _sweep(args)
        if args.command == "tasks":
            return _tasks(args)
        if args.command == "report":
            from .app.report import write_report

            written = write_report(args.results, args.output, plots_dir=args.plots, model_names=dict(args.model_name))
            print(f"wrote {written}")
            return 0
        settings = settings_from_args(args)
        _quiet_libraries()
        from . import app

        if args.command == "demo":
            app.run_demo(settings)
        elif args.command == "train":
            if app.train(settings).metrics is None:
                _end_replica()
        else:
            app.evaluate(settings)
    except LoradropError as err:
        _close_progress_bars()  # an error in the middle of training starts on its own line
        print(f"loradrop {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
