"""AdaLoRA with LoRA Dropout: a safe driver for AdaLoRA's rank allocation.

**Layers.** LoRA Dropout on AdaLoRA's `SVDLinear` layers (rows of P, columns of Q, never Λ) is in
`loradrop.adalora_layer`, imported here so that its layer handler is registered.

**Rank allocation.** PEFT leaves calling ``update_and_allocate`` to the user and has a few sharp edges. Use
`AdaLoraCallback` with the transformers ``Trainer``, or one line in a hand-written loop::

    loss.backward()
    optimizer.step()
    loradrop.adalora.adalora_step(model, step)  # step = optimizer steps done, counting this one (1, 2, ...)
    optimizer.zero_grad()

`adalora_schedule` picks ``init_r/target_r/tinit/tfinal/deltaT`` for a run length.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.adalora import AdaLoraModel
from peft.tuners.adalora.layer import AdaLoraLayer, RankAllocator
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .adalora_layer import AdaLoraSVDHandler  # noqa: F401 - importing it registers the SVDLinear handler

logger = logging.getLogger(__name__)


# ================================================================================================ rank allocation
def adalora_tuner(model: nn.Module) -> AdaLoraModel:
    """The `AdaLoraModel` inside a PeftModel (also through a DDP/accelerate ``.module`` wrapper)."""
    for candidate in (model, getattr(model, "module", None)):
        if candidate is None:
            continue
        if isinstance(candidate, AdaLoraModel):
            return candidate
        base = getattr(candidate, "base_model", None)
        if isinstance(base, AdaLoraModel):
            return base
    raise TypeError(f"an AdaLoRA PeftModel (peft.get_peft_model with an AdaLoraConfig) was expected, got "
                    f"{type(model).__name__}")


def _trainable(tuner: AdaLoraModel) -> tuple[str, Any, RankAllocator]:
    adapter = getattr(tuner, "trainable_adapter_name", None)
    allocator = getattr(tuner, "rankallocator", None)
    if adapter is None or allocator is None:
        raise ValueError(
            "this AdaLoRA model has no trainable adapter (all adapters are in inference mode), so there is no rank "
            "allocation to run; load it with is_trainable=True to train it"
        )
    return adapter, tuner.peft_config[adapter], allocator


def validate_adalora_config(config: Any, max_steps: int | None = None) -> None:
    """Raise ValueError if AdaLoRA's schedule cannot work (or does not match a run of `max_steps` optimizer steps)."""
    total = config.total_step
    if total is None or isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        hint = f" (this run has max_steps={max_steps})" if max_steps else ""
        raise ValueError(
            f"AdaLoraConfig.total_step must be the number of optimizer steps of the run, got {total!r}{hint}; "
            "use loradrop.adalora.adalora_schedule(total_steps) to fill the schedule"
        )
    if max_steps is not None and max_steps > 0 and total != max_steps:
        raise ValueError(
            f"AdaLoraConfig.total_step={total} but the Trainer runs max_steps={max_steps} optimizer steps; the rank "
            f"budget would {'never reach' if total > max_steps else 'reach'} target_r "
            f"{'before training ends' if total > max_steps else 'early and then stall'}. Set total_step={max_steps} "
            "(e.g. AdaLoraConfig(**loradrop.adalora.adalora_schedule(max_steps), ...))"
        )
    for name in ("tinit", "tfinal"):
        if getattr(config, name) < 0:
            raise ValueError(f"AdaLoraConfig.{name} must be >= 0, got {getattr(config, name)}")
    if config.tinit >= total - config.tfinal:
        raise ValueError(
            f"AdaLoRA schedule has no budgeting phase: tinit={config.tinit} >= total_step - tfinal = "
            f"{total} - {config.tfinal}; decrease tinit/tfinal or increase total_step"
        )
    if config.deltaT < 1:
        raise ValueError(f"AdaLoraConfig.deltaT must be >= 1, got {config.deltaT}")
    if config.target_r > config.init_r:
        raise ValueError(f"AdaLoraConfig.target_r={config.target_r} exceeds init_r={config.init_r}: AdaLoRA only "
                         "prunes ranks")


@contextlib.contextmanager
def _zero_filled_missing_grads(model: nn.Module, adapter: str) -> Iterator[None]:
    """Give every adapter parameter without a gradient a zero one while the allocator reads gradients.

    PEFT's ``RankAllocator.update_ipt`` computes ``p * p.grad`` for every ``lora_*`` parameter and crashes on
    ``None`` (peft#1721: frozen copies, layers unused in the forward). A zero gradient scores the parameter as
    unimportant, which is what an untrained parameter is. The gradients are set back to ``None`` afterwards.
    """
    try:
        from transformers.integrations import deepspeed_config

        deepspeed = deepspeed_config() is not None
    except ImportError:  # pragma: no cover - very old transformers
        deepspeed = False
    filled: list[torch.Tensor] = []
    if not deepspeed:  # DeepSpeed keeps gradients elsewhere and PEFT reads them through its own API
        for name, param in model.named_parameters():
            if "lora_" in name and adapter in name and param.grad is None:
                param.grad = torch.zeros_like(param)
                filled.append(param)
    try:
        yield
    finally:
        for param in filled:
            param.grad = None


def _full_pattern(model: nn.Module, adapter: str) -> dict[str, list[bool]]:
    return {n: [True] * p.shape[0] for n, p in model.named_parameters() if f"lora_E.{adapter}" in n}


@contextlib.contextmanager
def _guarded_allocator(allocator: RankAllocator, adapter: str) -> Iterator[None]:
    """Temporarily wrap this allocator instance's ``mask_to_budget`` against its edge cases.

    - ``kthvalue(k=init_budget - budget)`` raises for k <= 0 (peft#2337: budget still at its initial value, e.g.
      target_r == init_r or the cubic schedule rounding back to it): nothing is to be pruned, keep every triplet.
    - a forced allocation before any importance score was collected (a run of one budgeting step, or a late
      finalisation) would raise KeyError: score the current gradients first.
    """
    original = allocator.mask_to_budget

    def mask_to_budget(model_: nn.Module, budget: int) -> dict[str, list[bool]]:
        budget = max(0, int(budget))
        if allocator.init_bgt - budget <= 0:
            return _full_pattern(model_, adapter)
        if not allocator.exp_avg_ipt:
            allocator.update_ipt(model_)
        return original(model_, budget)

    allocator.__dict__["mask_to_budget"] = mask_to_budget
    try:
        yield
    finally:
        allocator.__dict__.pop("mask_to_budget", None)


def adalora_step(model: nn.Module, global_step: int) -> None:
    """Run AdaLoRA's importance update and rank allocation for one optimizer step, safely.

    Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()`` (the allocator reads the gradients).
    `global_step` counts optimizer steps done *including this one* (1 for the first): with that count, ``tinit``
    warm-up steps, ``tfinal`` final steps and ``tfinal=0`` (PEFT's default) all mean what `AdaLoraConfig` says;
    counting from 0 would never finalise the ranks when ``tfinal=0``.

    Compared with ``model.base_model.update_and_allocate(global_step)`` this skips parameters without gradients,
    survives the ``kthvalue`` edge cases and finalises the ranks if the final phase is entered without a pattern
    (e.g. a resumed run); the schedule is checked first.
    """
    tuner = adalora_tuner(model)
    adapter, config, allocator = _trainable(tuner)
    validate_adalora_config(config)
    final_start = config.total_step - config.tfinal
    with _zero_filled_missing_grads(tuner.model, adapter), _guarded_allocator(allocator, adapter):
        if global_step > final_start and config.rank_pattern is None:
            # PEFT would crash in mask_using_rank_pattern(None): the finalising step was missed, so do it now.
            warnings.warn(
                f"loradrop: AdaLoRA entered its final phase (step {global_step} > {final_start}) without a rank "
                "pattern; allocating the final ranks now",
                stacklevel=2,
            )
            tuner.update_and_allocate(final_start)
        else:
            tuner.update_and_allocate(global_step)


def _pattern_lookup(pattern: dict[str, Any], module_name: str, adapter: str) -> Any:
    for key in (f"{module_name}.lora_E.{adapter}", f"{module_name}.lora_E"):
        if key in pattern:
            return pattern[key]
    return None


def effective_ranks(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """Allocated rank of every AdaLoRA layer, keyed by module name (as in PEFT's ``rank_pattern``).

    A layer's rank is its count of kept triplets in the adapter's ``rank_pattern`` once AdaLoRA has allocated, and
    its full size (``lora_E`` rows) before that. The total is ``sum(effective_ranks(model).values())``.
    """
    tuner = adalora_tuner(model)
    if adapter_name is None:
        adapter_name = getattr(tuner, "trainable_adapter_name", None) or tuner.active_adapters[0]
    pattern = tuner.peft_config[adapter_name].rank_pattern or {}
    ranks: dict[str, int] = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, AdaLoraLayer) and adapter_name in module.lora_E:
            kept = _pattern_lookup(pattern, name, adapter_name)
            if kept is None:
                ranks[name] = int(module.lora_E[adapter_name].shape[0])
            else:
                ranks[name] = int(kept.sum().item()) if isinstance(kept, torch.Tensor) else int(sum(map(bool, kept)))
    return ranks


def adalora_schedule(
    total_steps: int,
    *,
    target_r: int = 8,
    init_r: int | None = None,
    warmup_fraction: float = 0.1,
    final_fraction: float = 0.25,
    interval_fraction: float = 0.01,
) -> dict[str, int]:
    """AdaLoRA schedule scaled to a run of `total_steps` optimizer steps: keyword arguments for `AdaLoraConfig`.

    Follows the AdaLoRA paper's GLUE recipe: an initial rank 1.5x the target (``init_r``), about 10% of the steps of
    warm-up before pruning (``tinit``), about 25% at the final ranks (``tfinal``) and a reallocation every ~1% of
    the run (``deltaT``). Short runs keep at least one budgeting step.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if target_r < 1:
        raise ValueError(f"target_r must be >= 1, got {target_r}")
    if init_r is None:
        init_r = math.ceil(1.5 * target_r)
    if init_r < target_r:
        raise ValueError(f"init_r={init_r} must be >= target_r={target_r}")
    for name, value in (("warmup_fraction", warmup_fraction), ("final_fraction", final_fraction),
                        ("interval_fraction", interval_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if warmup_fraction + final_fraction >= 1.0:
        raise ValueError("warmup_fraction + final_fraction must leave room for the budgeting phase (< 1)")
    tinit = int(round(warmup_fraction * total_steps))
    tfinal = int(round(final_fraction * total_steps))
    while tinit >= total_steps - tfinal:  # tiny runs: shrink the phases until one budgeting step remains
        if tfinal >= tinit and tfinal > 0:
            tfinal -= 1
        else:
            tinit -= 1
    return {
        "init_r": init_r,
        "target_r": target_r,
        "tinit": tinit,
        "tfinal": tfinal,
        "deltaT": max(1, int(round(interval_fraction * total_steps))),
        "total_step": total_steps,
    }


# ================================================================================================ Trainer callback
class _LossWatcher:
    """Warns once if a training forward skips AdaLoRA's orthogonal regulariser.

    `AdaLoraModel.forward` adds it only when the output has a tensor ``loss``, and a PeftModel without
    ``task_type`` bypasses `AdaLoraModel.forward` entirely; both are silent in PEFT.
    """

    def __init__(self, model: nn.Module, tuner: AdaLoraModel) -> None:
        self.warned = False
        self._tuner_ran = False
        self._outer = model
        self.handles = [tuner.register_forward_hook(self._tuner_hook)]
        if model is not tuner:
            self.handles.append(model.register_forward_pre_hook(self._outer_pre_hook))
            self.handles.append(model.register_forward_hook(self._outer_hook))

    def _tuner_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._tuner_ran = True
        if module is self._outer:  # no outer model: check here
            self._check(module, output)

    def _outer_pre_hook(self, module: nn.Module, args: Any) -> None:
        self._tuner_ran = False

    def _outer_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._check(module, output)

    def _check(self, module: nn.Module, output: Any) -> None:
        if self.warned or not module.training:
            return
        if not self._tuner_ran:
            self._warn(
                "the PeftModel has no task_type, so PEFT calls the transformers model directly and AdaLoRA's "
                "orthogonal regulariser is never added; set task_type in AdaLoraConfig (e.g. 'CAUSAL_LM')"
            )
        elif not isinstance(getattr(output, "loss", None), torch.Tensor):
            self._warn(
                "the model output has no loss (no labels passed?), so AdaLoRA's orthogonal regulariser is silently "
                "skipped; pass labels to the model, or add the regulariser to your own loss"
            )

    def _warn(self, message: str) -> None:
        self.warned = True
        warnings.warn(f"loradrop: {message}", stacklevel=3)
        logger.warning("loradrop: %s", message)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class AdaLoraCallback(TrainerCallback):
    """Drives AdaLoRA's rank allocation inside a transformers ``Trainer``, with its footguns removed.

    - ``on_train_begin``: checks that ``total_step`` is set and equals the Trainer's ``max_steps`` and that the
      schedule has a budgeting phase (ValueError otherwise); starts watching for outputs without a loss.
    - ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad()``): `adalora_step` with the count of
      optimizer steps done; logs the per-module and total effective ranks (to the logger and to
      ``state.log_history``) whenever they change.

    Usage: ``Trainer(..., callbacks=[loradrop.AdaLoraCallback()])``.
    """

    def __init__(self, *, log_ranks: bool = True, watch_loss: bool = True) -> None:
        self.log_ranks = log_ranks
        self.watch_loss = watch_loss
        self._watcher: _LossWatcher | None = None
        self._last_ranks: dict[str, int] | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("AdaLoraCallback needs the model (the Trainer passes it to callbacks)")
        tuner = adalora_tuner(model)
        _, config, _ = _trainable(tuner)
        validate_adalora_config(config, state.max_steps)
        self._last_ranks = None
        if self.watch_loss and self._watcher is None:
            self._watcher = _LossWatcher(model, tuner)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            return
        # state.global_step is incremented after this event: +1 counts the step just taken.
        step = state.global_step + 1
        adalora_step(model, step)
        if self.log_ranks:
            self._log_ranks(model, state, step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._watcher is not None:
            self._watcher.remove()
            self._watcher = None

    def _log_ranks(self, model: nn.Module, state: TrainerState, step: int) -> None:
        ranks = effective_ranks(model)
        if ranks == self._last_ranks:
            return
        self._last_ranks = ranks
        total = sum(ranks.values())
        _, _, allocator = _trainable(adalora_tuner(model))
        budget = allocator.budget_schedule(step)[0]
        logger.info("AdaLoRA step %d: total effective rank %d (budget %d); per module: %s", step, total, budget,
                    ranks)
        state.log_history.append(
            {"adalora_total_rank": total, "adalora_budget": int(budget), "adalora_ranks": dict(ranks), "step": step}
        )
