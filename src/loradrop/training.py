"""Training on transformers' Trainer: the LoRA Dropout callback (mask stream in checkpoints), a Trainer with atomic
checkpoints and member chunks, `chunked_backward` for hand-written loops, and TrainingArguments with loradrop's
defaults. (Prediction loops are in `loradrop.prediction`.)"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainingArguments

from .config import CONFIG_FILE_NAME, read_config_file
from .errors import TrainingDivergedError, UsageError
from .model import _find_controller, get_active_controller, inactive_reason, set_mask_state

# A batch key for tensors that the Trainer's ``compute_loss_func`` takes as keyword arguments and the model never sees
# (`LoraDropoutTrainer.compute_loss`): e.g. which rows of a batch are the choices of one question.
LOSS_INPUTS = "loss_inputs"

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
    for it, whose checkpoints appear atomically (written to a staging folder, then renamed into place, so an
    interrupted save never leaves a half-written ``checkpoint-N`` for ``--resume`` to pick up), and that stops on a
    non-finite loss or gradient.

    Non-finite steps: after the backward of a step's last micro-batch the step's losses and its gradient norm are
    checked (one host synchronisation per step, as transformers' own loss logging does). A NaN or infinite value
    raises `TrainingDivergedError` naming the step, the value and the likely cause. With
    ``skip_nonfinite_steps=True`` (a constructor argument or class attribute; `make_trainer` passes it) the step's
    gradients are dropped instead (set to None: the optimizer changes no weight and no state), the step number is
    appended to `nonfinite_steps`, logged as a warning, and the Trainer's logs carry ``nonfinite_steps_skipped``.
    Under fp16 dynamic loss scaling, inf/NaN gradients are the scaler's business (it skips such steps itself), so
    only the loss is checked.
    """

    _loradrop_chunk_weight: float | None = None
    skip_nonfinite_steps: bool = False

    def __init__(self, *args: Any, skip_nonfinite_steps: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if skip_nonfinite_steps is not None:
            self.skip_nonfinite_steps = bool(skip_nonfinite_steps)
        self.nonfinite_steps: list[int] = []  # steps (1-based, as global_step after them) whose update was skipped
        self._loradrop_losses: list[torch.Tensor] = []  # this step's micro-batch losses, checked at its last one

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D401 - Trainer hook
        loss = self._loradrop_members_step(model, inputs, num_items_in_batch)
        self._loradrop_losses.append(loss.detach().float().reshape(-1))
        if self.accelerator.sync_gradients:  # the step's gradients are complete (and reduced across processes)
            self._loradrop_check_step(model)
        return loss

    def _loradrop_check_step(self, model: torch.nn.Module) -> None:
        losses, self._loradrop_losses = torch.cat(self._loradrop_losses), []
        scaler = getattr(self.accelerator, "scaler", None)
        grads = [p.grad for p in model.parameters() if p.grad is not None] if scaler is None else []
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        norms = [torch.stack(torch._foreach_norm(group)).float().to(losses.device) for group in groups.values()]
        grad_norm = torch.linalg.vector_norm(torch.cat(norms)) if norms else losses.new_zeros(())
        if bool(torch.isfinite(losses).all() & torch.isfinite(grad_norm)):
            return
        step = self.state.global_step + 1
        bad = losses[~torch.isfinite(losses)]
        what = (f"the loss is {float(bad[0])} (not finite)" if bad.numel() else
                f"the gradient norm is {float(grad_norm)} (not finite) while the loss is {float(losses.sum())}")
        if not self.skip_nonfinite_steps:
            lr = f"learning_rate={self.args.learning_rate:g}"
            if self.optimizer is not None and self.optimizer.param_groups[0]["lr"] != self.args.learning_rate:
                lr += f", {self.optimizer.param_groups[0]['lr']:g} at this step"
            attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
            kernel = ""
            if not bad.numel() and (self.args.bf16 or self.args.fp16) and attention == "sdpa":
                # seen on an H200: bf16 + sdpa gave NaN gradients (finite loss) on left-padded SmolLM2 batches,
                # at the same step for every learning rate; eager attention, or fp32, trained them (studies/gpu)
                kernel = (" A finite loss with a non-finite gradient in mixed precision can also be the attention "
                          "kernel's backward (sdpa on padded batches): try attn_implementation='eager' "
                          "(--attn-implementation eager) or full precision.")
            raise TrainingDivergedError(
                f"training diverged at step {step}: {what}. The likely cause is a learning rate too "
                f"high for this model ({lr}): lower it, or warm it up; or pass skip_nonfinite_steps=True to skip "
                f"such steps.{kernel}".rstrip("."))
        self.nonfinite_steps.append(step)
        if scaler is None:  # (with a scaler, the non-finite gradients make it skip the step itself)
            model.zero_grad(set_to_none=True)
        logger.warning("loradrop: step %d: %s; its update is skipped (%d step(s) skipped so far)",
                       step, what, len(self.nonfinite_steps))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.nonfinite_steps and "loss" in logs:
            logs = {**logs, "nonfinite_steps_skipped": len(self.nonfinite_steps)}
        super().log(logs, *args, **kwargs)

    def _loradrop_members_step(self, model, inputs, num_items_in_batch=None):
        controller = _find_controller(model)
        if controller is None or len(controller.config.chunks) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        samples, last = controller.config.samples, len(controller.config.chunks) - 1
        # Under DeepSpeed, accelerate's backward is the engine's backward AND, when sync_gradients is set, its step
        # (accelerate's DeepSpeedEngineWrapper): every chunk would update the weights. So only the last chunk of a
        # step may see sync_gradients; the others run as gradient-accumulation micro-steps of the engine (not its
        # boundary, no step), DeepSpeed's pattern for several backward passes per optimizer step.
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if deepspeed:
            _require_deepspeed_sync_flag()
        sync = self.accelerator.sync_gradients
        total = None
        for index, (_, size) in enumerate(controller.member_chunks()):
            # Every chunk's loss is the mean over its members; weighted by size / N the chunks add up to the mean
            # over all N, in value and in gradient (compute_loss applies the weight before the backward).
            self._loradrop_chunk_weight = size / samples
            if deepspeed:
                self.accelerator.gradient_state._set_sync_gradients(sync and index == last)
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._loradrop_chunk_weight = None
                if deepspeed:
                    self.accelerator.gradient_state._set_sync_gradients(sync)
            total = loss if total is None else total + loss
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D401
        loss_inputs, func = inputs.get(LOSS_INPUTS), self.compute_loss_func
        if loss_inputs is not None and func is not None:
            # tensors the loss needs and the model must not get (e.g. which rows form a question): bound to the
            # loss for this call, left out of the model's inputs; `inputs` itself is left as it is (member chunks
            # call this again with it)
            inputs = {k: v for k, v in inputs.items() if k != LOSS_INPUTS}
            self.compute_loss_func = functools.partial(func, **loss_inputs)
        try:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        finally:
            self.compute_loss_func = func
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
    """TrainingArguments with loradrop's defaults: no external reporting, CPU when no GPU, AdamW, linear decay, no
    warmup or weight decay. `extra` holds any other TrainingArguments fields (warmup, scheduler, mixed precision,
    ``report_to``...); its values win over these defaults."""
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
                 callbacks: Sequence[TrainerCallback] = (), compute_metrics=None,
                 skip_nonfinite_steps: bool = False) -> LoraDropoutTrainer:
    """A `LoraDropoutTrainer` with the `LoraDropoutCallback`; `skip_nonfinite_steps`: skip (and count) steps with a
    non-finite loss or gradient instead of stopping with `TrainingDivergedError`."""
    return LoraDropoutTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              data_collator=collator, callbacks=[LoraDropoutCallback(), *callbacks],
                              compute_metrics=compute_metrics, skip_nonfinite_steps=skip_nonfinite_steps)


def _require_deepspeed_sync_flag() -> None:
    """Member chunks under DeepSpeed need accelerate's DeepSpeedEngineWrapper.backward to take `sync_gradients`
    (accelerate 1.15 does): older versions step the engine after every backward, i.e. once per chunk, silently."""
    import inspect

    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    if "sync_gradients" not in inspect.signature(DeepSpeedEngineWrapper.backward).parameters:
        import accelerate

        raise UsageError(f"member_chunk under DeepSpeed needs an accelerate whose DeepSpeedEngineWrapper.backward "
                         f"takes sync_gradients (installed: {accelerate.__version__}, which would step the optimizer "
                         "after every chunk); upgrade accelerate or set member_chunk=None")

