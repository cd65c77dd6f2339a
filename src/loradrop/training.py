"""Training on transformers' Trainer: the LoRA Dropout callback (mask stream in checkpoints), a Trainer with atomic
checkpoints and member chunks, `chunked_backward` for hand-written loops, and TrainingArguments with loradrop's
defaults. (Prediction loops are in `loradrop.prediction`.)"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .config import CONFIG_FILE_NAME, read_config_file
from .model import _find_controller, get_active_controller, inactive_reason, set_mask_state

logger = logging.getLogger("loradrop")


class LoraDropoutCallback(TrainerCallback):
    """Keeps the mask stream with Trainer checkpoints.

    ``model.save_pretrained`` (which the Trainer calls for every checkpoint) stores the mask position beside the
    adapter; on ``trainer.train(resume_from_checkpoint=...)`` this callback puts it back, so the resumed run draws
    exactly the masks the uninterrupted run would have drawn.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        controller = _find_controller(model) if model is not None else None
        if controller is None:
            return
        reason = inactive_reason(controller)
        if reason is not None:
            warnings.warn(f"loradrop: training without LoRA Dropout: {reason}", UserWarning, stacklevel=2)
        if state.global_step == 0:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (checkpoint / CONFIG_FILE_NAME).is_file():
            warnings.warn(f"loradrop: resuming at step {state.global_step} without {checkpoint / CONFIG_FILE_NAME}; "
                          "the mask stream restarts from its current position", stacklevel=2)
            return
        mask_state = read_config_file(checkpoint).get("mask_state")
        if mask_state:
            set_mask_state(model, mask_state)
            logger.info("loradrop: restored mask state %s", mask_state)


def chunked_backward(model: torch.nn.Module, batch: Mapping[str, Any],
                     loss_fn: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """Forward and backward of ONE training step with ``samples=N``, `member_chunk` members per pass.

    For hand-written loops (the Trainer does this itself): call it where you would call ``model(**batch)`` and
    ``loss.backward()``, then step the optimizer as usual. Each chunk's loss (``out.loss``, or `loss_fn(out)`, a
    mean over the chunk) is weighted by its share of the N members, so loss and gradients equal the one-call step
    while only one chunk's activations are alive at a time. Returns the step's loss (detached).
    """
    controller = get_active_controller(model, "chunked_backward")
    if not model.training:
        raise ValueError("chunked_backward runs a training step: call model.train() first")
    samples = controller.config.samples
    total = None
    for _, size in controller.member_chunks():
        out = model(**batch)
        loss = (loss_fn(out) if loss_fn is not None else out.loss) * (size / samples)
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


class LoraDropoutTrainer(Trainer):
    """A `Trainer` that runs ``samples=N`` in chunks of ``member_chunk`` members per pass when the config asks
    for it, and whose checkpoints appear atomically: written to a staging folder, then renamed into place, so an
    interrupted save never leaves a half-written ``checkpoint-N`` for ``--resume`` to pick up."""

    _loradrop_chunk_weight: float | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D401 - Trainer hook
        controller = _find_controller(model)
        if controller is None or len(controller.config.chunks) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        samples = controller.config.samples
        total = None
        for _, size in controller.member_chunks():
            # Every chunk's loss is the mean over its members; weighted by size / N the chunks add up to the mean
            # over all N, in value and in gradient (compute_loss applies the weight before the backward).
            self._loradrop_chunk_weight = size / samples
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._loradrop_chunk_weight = None
            total = loss if total is None else total + loss
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D401
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        weight = self._loradrop_chunk_weight
        if weight is None:
            return out
        if return_outputs:
            loss, outputs = out
            return loss * weight, outputs
        return out * weight

    def _save_checkpoint(self, model, trial) -> None:  # noqa: D401 - Trainer hook
        run_dir = self._get_output_dir(trial=trial)
        staging_root = os.path.join(run_dir, ".staging")
        name = f"checkpoint-{self.state.global_step}"
        original = self._get_output_dir
        self._get_output_dir = lambda trial=None: staging_root  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = original  # type: ignore[method-assign]
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            if self.args.save_total_limit:
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        if self.args.parallel_mode.value == "distributed":
            torch.distributed.barrier()


def loss_history(trainer: Trainer) -> dict[str, list[dict[str, float]]]:
    """The train and eval loss curves from the Trainer's log history."""
    train, evaluation = [], []
    for entry in trainer.state.log_history:
        if "loss" in entry:
            train.append({"step": entry["step"], "loss": entry["loss"]})
        if "eval_loss" in entry:
            evaluation.append({"step": entry["step"], "loss": entry["eval_loss"]})
    return {"train": train, "eval": evaluation}


def build_training_args(output_dir: str | os.PathLike[str], *, epochs: float = 1.0, max_steps: int = -1,
                        lr: float = 5e-4, batch_size: int = 32, seed: int = 0, logging_steps: int = 10,
                        save_steps: int | None = None, eval_steps: int | None = None, progress: bool = True,
                        extra: dict[str, Any] | None = None) -> TrainingArguments:
    """TrainingArguments with loradrop's defaults: no external reporting, CPU when no GPU, AdamW, linear decay."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=max(batch_size, 32),
        seed=seed,
        data_seed=seed,
        logging_steps=logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        report_to=[],
        disable_tqdm=not progress,
        warmup_steps=0,
        weight_decay=0.0,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    kwargs.update(extra or {})
    return TrainingArguments(**kwargs)


def make_trainer(model, args: TrainingArguments, train_dataset, eval_dataset=None, *, collator=None,
                 callbacks: Sequence[TrainerCallback] = (), compute_metrics=None) -> LoraDropoutTrainer:
    return LoraDropoutTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              data_collator=collator, callbacks=[LoraDropoutCallback(), *callbacks],
                              compute_metrics=compute_metrics)
