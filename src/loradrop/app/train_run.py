"""``loradrop train`` as a Python function: fine-tune a task with LoRA (or AdaLoRA) plus LoRA Dropout on the
transformers ``Trainer``, evaluate the single pass and the test-time ensemble, and write the run folder.

A run folder holds ``metrics.json`` (settings, versions, hardware, data metadata, wall times, ``eval.single`` and
``eval.ensemble``), ``adapter/`` (standard PEFT files plus ``loradrop_config.json``), ``predictions.jsonl``,
``loss_history.json``, ``train.log``, ``run_config.json`` and the ``checkpoint-N`` folders of ``save_steps``.
Under ``torchrun`` the Trainer trains with DDP and only rank 0 evaluates and writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError, UsageError
from .acting import prepare_ood, uncertainty_section
from .epochs import check_task_options
from .integrity import verify_manifest, write_manifest
from .outputs import data_caveats, headline, print_metrics, write_run_outputs
from .provenance import hardware, jsonable, peak_memory, versions
from .runfolder import (
    ADAPTER_DIR,
    LOG_FILE,
    LOSS_HISTORY_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RUN_CONFIG_FILE,
    STATUS_FILE,
    VALIDATION_PREDICTIONS_FILE,
    RunPlan,
    checkpoints,
    plan_run,
    publish,
    replace_dir,
    run_lock,
    run_log,
    stored_settings,
    write_json,
    write_jsonl,
)
from .settings import TrainSettings

logger = logging.getLogger("loradrop.app")


@dataclass
class RunResult:
    """What a run wrote: its folder, the metrics file and its content (None on the non-writing DDP ranks)."""

    output: Path
    metrics_file: Path | None
    metrics: dict[str, Any] | None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_steps(n_rows: int, settings: TrainSettings, world_size: int) -> int:
    """Optimizer steps the Trainer will run (its own formula)."""
    if settings.max_steps > 0:
        return int(settings.max_steps)
    batches = max(1, math.ceil(n_rows / (settings.batch_size * world_size)))
    per_epoch = max(1, math.ceil(batches / settings.gradient_accumulation_steps))
    return max(1, math.ceil(settings.epochs * per_epoch))


def build_peft_config(settings: TrainSettings, kind: str, target_modules: list[str], total_steps: int) -> Any:
    """LoraConfig (lora_dropout=0: LoRA Dropout replaces it), or AdaLoraConfig with a schedule for the run."""
    from peft import AdaLoraConfig, LoraConfig

    from ..pretrained import model_kind

    # LoRA Dropout replaces PEFT's element-wise lora_dropout; `peft_dropout` keeps it for the baselines
    common = dict(lora_alpha=settings.alpha, target_modules=target_modules, lora_dropout=settings.peft_dropout,
                  task_type=model_kind(kind).peft_task_type)
    if settings.method == "adalora":
        from ..adalora import adalora_schedule

        return AdaLoraConfig(**adalora_schedule(total_steps, target_r=settings.r), **common)
    return LoraConfig(r=settings.r, **common)


def _ddp_options(world_size: int) -> dict[str, Any] | None:
    """TrainingArguments for several processes: gloo on CPU; every trainable parameter is used in each step."""
    if world_size <= 1:
        return None
    options: dict[str, Any] = {"ddp_find_unused_parameters": False}
    if not torch.cuda.is_available():
        options["ddp_backend"] = "gloo"
    return options


def _leave_process_group() -> None:
    """After training under torchrun: synchronise once, then close the process group on every rank, so that
    replicas exit cleanly while rank 0 evaluates and writes alone (no collective call is left to wait on)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _log_callback() -> Any:
    from transformers import TrainerCallback

    class LogToFile(TrainerCallback):
        """Trainer log entries (loss, learning rate, eval loss) into the run log."""

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401 - Trainer hook
            if logs and state.is_world_process_zero:
                logger.info("step %d: %s", state.global_step, json.dumps(jsonable(logs), sort_keys=True))

        def on_step_end(self, args, state, control, **kwargs):  # noqa: D401 - Trainer hook
            # the loss of every step reaches the log (and the checkpoint) before a save and at the end
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True

        def on_save(self, args, state, control, **kwargs):  # noqa: D401 - Trainer hook
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    write_manifest(checkpoint)

    return LogToFile()


def check_training_controls(settings: TrainSettings, world_size: int) -> None:
    """What the training controls need from this machine, checked before any model is loaded."""
    import importlib.util

    if settings.fp16 and not torch.cuda.is_available():
        raise UsageError("--fp16 needs a CUDA GPU (none is available); use --bf16 or full precision on CPU")
    if "tensorboard" in settings.report_to_list and not any(
            importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise UsageError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    if settings.early_stopping_patience is not None and world_size > 1:
        raise UsageError("--early-stopping-patience runs in one process only (the per-epoch evaluation is rank 0's)")


def _resolve_data_dir(settings: TrainSettings) -> TrainSettings:
    """An existing local data folder is recorded as an absolute path (for resume and eval)."""
    if settings.data_dir is not None and Path(settings.data_dir).expanduser().exists():
        return settings.replace(data_dir=str(Path(settings.data_dir).expanduser().resolve()))
    return settings


def train(settings: TrainSettings, *, callbacks: Sequence[Any] = ()) -> RunResult:
    """Fine-tune, evaluate and write the run folder described by `settings`.

    `callbacks` are extra Trainer callbacks (for tests and embedding). Raises a `loradrop.errors.LoradropError` for
    bad input, before anything is written. One process owns a run folder at a time (a lock file beside it).
    """
    settings = _resolve_data_dir(settings)
    output = Path(settings.output).expanduser()
    owner = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 owns the run folder
    with run_lock(output) if owner else contextlib.nullcontext():
        return _train(settings, callbacks)


def _train(settings: TrainSettings, callbacks: Sequence[Any]) -> RunResult:
    from peft import get_peft_model

    from ..model import apply_lora_dropout
    from ..pretrained import check_model_fits, default_target_modules, load_model, load_tokenizer, prepare_base
    from ..tasks import prepare_task, resolve_task
    from ..tasks.cloze_scoring import with_choice_scoring
    from ..training import build_training_args

    plan = plan_run(settings.output, resume=settings.resume, overwrite=settings.overwrite)
    if plan.resume_from is not None:
        verify_manifest(plan.resume_from)  # a corrupted checkpoint is refused before anything is loaded
    stored = stored_settings(plan)
    if stored is not None:
        changed = settings.resume_differences(stored)
        if changed:
            raise UsageError(f"--resume with settings that differ from the run being resumed: {', '.join(changed)}")
    ld_config = settings.lora_dropout_config()
    spec = with_choice_scoring(resolve_task(settings.task, settings.data_dir), settings.choice_scoring)
    check_task_options(settings, spec)  # holdout_fraction / epoch_eval / MC dropout: what its evaluation serves
    check_training_controls(settings, _world_size())
    model_name = settings.model or _default_model(spec.kind)
    config = check_model_fits(model_name, spec.kind)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and settings.max_seq_len > positions:
        raise UsageError(f"--max-seq-len {settings.max_seq_len} exceeds the {positions} positions of model "
                         f"{model_name!r}; use --max-seq-len {positions} or less")
    tokenizer = load_tokenizer(model_name)
    data = prepare_task(spec, settings.data_dir, tokenizer, max_seq_len=settings.max_seq_len, seed=settings.seed,
                        max_train_samples=settings.max_train_samples, max_eval_samples=settings.max_eval_samples,
                        holdout_fraction=settings.holdout_fraction)
    ood_data = prepare_ood(settings.ood_task, settings.data_dir, tokenizer, max_seq_len=settings.max_seq_len,
                           seed=settings.seed, max_eval_samples=settings.max_eval_samples,
                           choice_scoring=settings.choice_scoring)  # before training
    world_size = _world_size()
    total_steps = train_steps(len(data.train), settings, world_size)

    torch.manual_seed(settings.seed)  # new heads start the same in every process and every resumed run
    base = prepare_base(load_model(model_name, spec.kind, num_labels=spec.num_labels or None,
                                   attn_implementation=settings.attn_implementation), tokenizer)
    if spec.kind == "causal_lm":
        base.config.use_cache = False
    target_modules = settings.target_module_list or default_target_modules(base)
    peft_config = build_peft_config(settings, spec.kind, target_modules, total_steps)
    model = get_peft_model(base, peft_config)
    if ld_config is not None:
        apply_lora_dropout(model, ld_config)

    logging_steps = max(1, min(50, total_steps // 20))
    training_args = build_training_args(plan.work, epochs=settings.epochs, max_steps=settings.max_steps,
                                        lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed,
                                        logging_steps=logging_steps, save_steps=settings.save_steps,
                                        eval_steps=settings.eval_steps,
                                        extra={**(_ddp_options(world_size) or {}), **settings.training_arguments()})
    main = int(getattr(training_args, "process_index", 0)) == 0
    with training_args.main_process_first(local=False, desc="prepare the run folder"):
        if main:
            if plan.fresh:
                shutil.rmtree(plan.work, ignore_errors=True)
            plan.work.mkdir(parents=True, exist_ok=True)
    run = _Run(settings, plan, spec, data, tokenizer, model, model_name, peft_config, ld_config, training_args,
               total_steps, target_modules, ood_data)
    try:
        with run_log(plan.work / LOG_FILE if main else None):
            return run.train_and_write(callbacks)
    except BaseException as err:
        kept = main and run.trained and _keep_trained(plan, err)
        if main and not kept:
            if plan.fresh and not checkpoints(plan.work):
                shutil.rmtree(plan.work, ignore_errors=True)
            elif checkpoints(plan.work):
                logger.warning("loradrop: the run stopped; continue it with --resume (checkpoints in %s)", plan.work)
        if isinstance(err, OSError) and err.errno in _OUTPUT_ERRNOS:
            where = f"; the trained adapter is kept in {str(plan.output / ADAPTER_DIR)!r}" if kept else ""
            raise OutputError(f"writing the run folder {str(plan.work)!r} failed: {err.strerror} "
                              f"({err.filename or 'a file'}); free space or choose another --output{where}") from err
        raise


def _keep_trained(plan: RunPlan, err: BaseException) -> bool:
    """Training finished and its adapter is saved, but evaluation (or writing its results) failed: keep the run
    folder, marked as not evaluated, so ``loradrop eval --adapter`` can evaluate it without training again."""
    try:
        write_json(plan.work / STATUS_FILE, {"status": "trained, not evaluated",
                                             "error": f"{type(err).__name__}: {err}"})
        for leftover in plan.work.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        publish(plan)
    except OSError:  # e.g. the disk is full: the staging folder stays where it is, with the adapter
        return False
    logger.warning("loradrop: evaluation failed (%s: %s); the trained adapter is kept in %s: evaluate it with "
                   "`loradrop eval --adapter %s`", type(err).__name__, err, plan.output / ADAPTER_DIR, plan.output)
    return True


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR}


def mean_train_loss(log_history: Sequence[dict[str, Any]]) -> float | None:
    """The mean training loss over every step, from the Trainer's log entries (each the mean over the steps since
    the previous one). Equal for an uninterrupted and a resumed run, because the logs are kept in checkpoints and a
    log entry is forced at every save and at the last step."""
    total, steps, last = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            covered = int(entry["step"]) - last
            total += float(entry["loss"]) * covered
            steps += covered
            last = int(entry["step"])
    return total / steps if steps else None


def _default_model(kind: str) -> str:
    from ..pretrained import model_kind

    return model_kind(kind).default_model


@dataclass
class _Run:
    """One training run, built by `train`: trains, evaluates on rank 0, writes the run folder."""

    settings: TrainSettings
    plan: RunPlan
    spec: Any
    data: Any
    tokenizer: Any
    model: Any
    model_name: str
    peft_config: Any
    ld_config: Any
    training_args: Any
    total_steps: int
    target_modules: list[str]
    ood_data: Any = None  # the --ood-task's evaluation split
    trained: bool = False  # the adapter of the finished training is saved in the run folder

    @property
    def main(self) -> bool:
        return int(getattr(self.training_args, "process_index", 0)) == 0

    @property
    def ensemble(self) -> int:
        return 0 if self.settings.ensemble_kind == "none" else self.settings.ensemble

    def evaluate(self, split: str | None = None, *, ensemble: bool = True, progress: bool = True) -> Any:
        """The task's evaluation of the current model on `split` (default: its evaluation split)."""
        s = self.settings
        options: dict[str, Any] = {}
        if split is not None:
            options["split"] = split
        if s.ensemble_kind == "mc_dropout":
            options["mc_dropout"] = True
        if not progress:
            options["progress"] = False
        return self.spec.evaluate(self.model, self.data, self.tokenizer, batch_size=s.batch_size,
                                  ensemble=self.ensemble if ensemble else 0, chunk_size=s.chunk_size, seed=s.seed,
                                  **options)

    def _load_finished(self, trainer: Any) -> None:
        """Resume a run whose last checkpoint is its final step: load the weights, the Trainer state (its logs) and
        the mask stream's position, and train nothing. (transformers' Trainer, resumed at max_steps, would run one
        more step.)"""
        from transformers import TrainerState

        from ..config import CONFIG_FILE_NAME, read_config_file
        from ..model import set_mask_state

        checkpoint = self.plan.resume_from
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        if self.ld_config is not None and (checkpoint / CONFIG_FILE_NAME).is_file():
            mask_state = read_config_file(checkpoint).get("mask_state")
            if mask_state:
                set_mask_state(self.model, mask_state)
        logger.info("resumed at the final step %d: nothing left to train", trainer.state.global_step)

    def _attach_test_masks(self) -> None:
        """The "test only" ablation: LoRA Dropout masks on a model trained without them. The single pass stays the
        plain model (eval mode "raw"); the ensemble's members are the masked models."""
        from ..config import LoraDropoutConfig
        from ..model import apply_lora_dropout

        s = self.settings
        apply_lora_dropout(self.model, LoraDropoutConfig(p=s.p, strategy=s.strategy, rescale=s.rescale, seed=s.seed,
                                                         eval_mode="raw"))

    def _epoch_callback(self) -> Any:
        from .epochs import EpochEvaluation

        splits = ("validation", self.data.eval_split) if self.data.eval_split != "validation" else ("validation",)
        # single pass only: an ensemble per epoch would cost as much as the training itself on small tasks
        return EpochEvaluation(lambda split: self.evaluate(split, ensemble=False, progress=False),
                               splits, "validation", self.spec.main_metric,
                               patience=self.settings.early_stopping_patience)

    def train_and_write(self, callbacks: Sequence[Any]) -> RunResult:
        from ..pretrained import model_id
        from ..training import loss_history, make_trainer

        s, plan = self.settings, self.plan
        if self.main:
            write_json(plan.work / RUN_CONFIG_FILE, {"args": s.to_dict(), "model": model_id(self.model_name),
                                                    "task": self.spec.name})
            logger.info("loradrop train: %s", " ".join(f"{k}={v}" for k, v in sorted(s.to_dict().items())))
            logger.info("data: %s", self.data.metadata.get("summary", ""))
            for caveat in data_caveats(self.data.metadata):
                logger.info("data caveat: %s", caveat)
                print(f"data caveat: {caveat}", flush=True)
        extra_callbacks = [_log_callback(), *callbacks]
        epoch_eval = self._epoch_callback() if s.epoch_eval else None
        if epoch_eval is not None:
            extra_callbacks.append(epoch_eval)
        if s.method == "adalora":
            from ..adalora import AdaLoraCallback

            extra_callbacks.insert(0, AdaLoraCallback())
        trainer = make_trainer(self.model, self.training_args, self.data.train,
                               self.data.eval_loss if s.eval_steps else None, collator=self.data.collator,
                               callbacks=extra_callbacks,
                               skip_nonfinite_steps=s.skip_nonfinite_steps)
        if self.data.compute_loss_func is not None:  # e.g. the cross-entropy over answer letters (commonsense)
            trainer.compute_loss_func = self.data.compute_loss_func
        if self.spec.kind != "causal_lm":
            # Classification/QA heads average their loss themselves and ignore `num_items_in_batch`; without this
            # the Trainer would still multiply their loss by the number of processes under DDP.
            trainer.model_accepts_loss_kwargs = False
        if plan.resume_from is not None:
            logger.info("resuming from %s", plan.resume_from)
        start = time.perf_counter()
        if plan.resume_from is not None and int(plan.resume_from.name.split("-", 1)[1]) >= self.total_steps:
            self._load_finished(trainer)  # the Trainer would train one step too many
        else:
            trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
        train_s = time.perf_counter() - start
        _leave_process_group()
        if not self.main:
            return RunResult(plan.output, None, None)
        # the trained adapter is written before evaluation: a failed evaluation loses no training
        adapter_tmp = plan.work / f".{ADAPTER_DIR}.tmp"
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        self.model.save_pretrained(str(adapter_tmp))
        write_manifest(adapter_tmp)
        replace_dir(adapter_tmp, plan.work / ADAPTER_DIR)
        self.trained = True
        if s.ensemble_kind == "masks":
            self._attach_test_masks()
        start = time.perf_counter()
        result = self.evaluate()
        eval_s = time.perf_counter() - start
        validation = None
        if self.data.eval_split != "validation" and s.holdout_fraction is not None:
            validation = self.evaluate("validation")  # for post-hoc calibration fitted on held-out data
            write_jsonl(plan.work / VALIDATION_PREDICTIONS_FILE, validation.rows)
        write_jsonl(plan.work / PREDICTIONS_FILE, result.rows)
        history = loss_history(trainer)
        write_json(plan.work / LOSS_HISTORY_FILE, history)
        metrics = self._metrics(result, trainer, train_s, eval_s)
        if validation is not None:
            metrics["eval"]["validation"] = {"single": validation.single, "ensemble": validation.ensemble}
        if s.ood_task is not None or s.conformal_alpha is not None:  # as `loradrop eval` writes it (app.acting)
            metrics["uncertainty"] = uncertainty_section(
                self.model, result.rows, plan.work, ood_data=self.ood_data, ood_task=s.ood_task,
                alpha=s.conformal_alpha, calibration_rows=validation.rows if validation else None, prefix="",
                batch_size=s.batch_size, ensemble=self.ensemble, chunk_size=s.chunk_size, seed=s.seed,
                mc_dropout=s.ensemble_kind == "mc_dropout")
        if epoch_eval is not None:
            metrics["epochs"] = epoch_eval.epochs
            metrics["best_epoch"] = epoch_eval.best
            if s.early_stopping_patience is not None:
                metrics["early_stopping"] = {"patience": s.early_stopping_patience, "stopped": epoch_eval.stopped,
                                             "weights": "best epoch" if epoch_eval.best else "last step"}
            for split, rows in epoch_eval.best_rows.items():
                write_jsonl(plan.work / f"best_epoch_{split}_predictions.jsonl", rows)
        write_json(plan.work / METRICS_FILE, metrics)
        logger.info("eval single: %s", json.dumps(jsonable(headline(result.single))))
        if result.ensemble is not None:
            logger.info("eval ensemble: %s", json.dumps(jsonable(headline(result.ensemble))))
        written = write_run_outputs(plan.work, metrics, predictions=PREDICTIONS_FILE, history=history,
                                    masked=self.ld_config is not None, title=f"loradrop train: {s.task}")
        publish(plan)
        label = self.spec.name if s.task == self.spec.name else f"{s.task} ({self.spec.name})"  # instruct (alpaca)
        print_metrics(label, self.data.eval_split, result.single, result.ensemble)
        print(f"wrote {plan.output}/{METRICS_FILE}, {', '.join(written)}, {ADAPTER_DIR}/, {PREDICTIONS_FILE}, "
              f"{LOSS_HISTORY_FILE}, {LOG_FILE}", flush=True)
        return RunResult(plan.output, plan.output / METRICS_FILE, jsonable(metrics))

    def _metrics(self, result: Any, trainer: Any, train_s: float, eval_s: float) -> dict:
        from ..pretrained import model_id

        s = self.settings
        return {
            "task": s.task,
            "registry_task": self.spec.name,
            "kind": self.spec.kind,
            "model": model_id(self.model_name),
            "seed": s.seed,
            "config": {
                "args": s.to_dict(),
                "method": s.method,
                "peft": jsonable(self.peft_config.to_dict()),
                "lora_dropout": self.ld_config.to_dict() if self.ld_config is not None else None,
                "target_modules": self.target_modules,
                "ensemble": self.ensemble,
                "ensemble_kind": s.ensemble_kind,
                "eval_batch_size": s.batch_size,
                "total_steps": self.total_steps,
                "world_size": int(self.training_args.world_size),
                "per_device_batch_size": s.batch_size,
                "training_arguments": jsonable(s.training_arguments()),
                **self.data.recorded,
            },
            "versions": versions(),
            "hardware": hardware(),
            "wall_time": {"train_s": train_s, "eval_s": eval_s},
            "peak_memory_mib": peak_memory(),
            "data": self.data.metadata,
            "eval_split": self.data.eval_split,
            "eval": {"single": result.single, "ensemble": result.ensemble},
            "train": {"global_step": int(trainer.state.global_step),
                      "nonfinite_steps_skipped": list(getattr(trainer, "nonfinite_steps", [])),
                      "train_loss": mean_train_loss(trainer.state.log_history),
                      "resumed_from": self.plan.resume_from.name if self.plan.resume_from else None,
                      "checkpoints": [p.name for p in checkpoints(self.plan.work)]},
            "files": {"adapter": ADAPTER_DIR, "predictions": PREDICTIONS_FILE, "loss_history": LOSS_HISTORY_FILE,
                      "log": LOG_FILE},
        }
