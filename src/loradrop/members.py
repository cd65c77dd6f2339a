"""Members: independent draws of every mask in the model, and the per-model controller that plans them.

One idea carries the library (see docs/DESIGN.md): a *member* is one independent draw of all masks.

| feature                              | members M in one call | batch layout                        |
|--------------------------------------|-----------------------|-------------------------------------|
| training, ``samples=N``              | N                     | batch repeated N times, member-major |
| training, ``mask_scope="example"``   | one per row           | as it is                            |
| test-time ensemble of n              | n (or a chunk)        | batch repeated n (or chunk) times   |

The controller is attached to one model instance and is complete when constructed: it gets the adapted layers
(``(module, adapter, handler)`` triples) and their `masks.FeatureSlices` from `model.apply_lora_dropout`. Forward
pre-hooks (on the PeftModel and on the wrapped transformers model, guarded so only the outermost call acts) decide the
plan of each call, repeat the batch where members share it, and hand the adapted layers a `CallPlan`. The all-layer
masked weights of a call are built by the controller's `precompute.WeightPrecompute`.

This module imports no loradrop module that imports it back (layers and handlers import it, not the reverse).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .config import LoraDropoutConfig
from .distributed import broadcast_stream, data_parallel_rank, global_member_ids
from .masks import STREAM_ENSEMBLE, STREAM_INPUT, STREAM_TRAIN, FeatureSlices, derive_key, keep_mask
from .precompute import WeightPrecompute

# Keyword arguments that are never batch-shaped, even when their first dimension happens to equal the batch size.
_NOT_BATCHED = frozenset({"past_key_values", "cache_position", "num_items_in_batch", "logits_to_keep", "use_cache"})
BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


@dataclass(frozen=True)
class CallPlan:
    """What the adapted layers do in one model call.

    `mask` and `input_key` are drawn once per call by the model's pre-hook (outside any ``torch.compile`` graph),
    so the layers read tensors only: under ``torch.compile`` a new step changes tensor values, never a Python
    constant the graph was specialised on.
    """

    masked: bool
    training: bool
    key: int = 0
    members: int | None = None  # None: one member per row (example scope)
    member_offset: int = 0
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (members, features) keep-mask
    # Per layer index: (masked A or None, masked B or None) with the layer's scaling folded in, or None for a layer
    # that computes its own (see precompute.WeightPrecompute).
    weights: list[Any] | None = field(default=None, compare=False, repr=False)
    input_key: torch.Tensor | None = field(default=None, compare=False, repr=False)  # "input" strategy's key
    # Example scope on several data-parallel ranks: (rank, world size, batch repeats); each row's member id is its
    # index in the global batch (distributed.global_member_ids). None: member ids are the local row indices.
    ranks: tuple[int, int, int] | None = None


def batch_size_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of a model call, read from its usual input tensors."""
    for name in BATCH_KEYS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in args:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def repeat_batch(args: tuple[Any, ...], kwargs: dict[str, Any], times: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Repeat every batch-shaped tensor `times` times along dim 0, member-major (all of member 0, then member 1...)."""
    batch = batch_size_of(args, kwargs)
    if batch is None:
        raise ValueError(
            "loradrop could not find the batch in this model call (looked for a tensor argument or one of "
            f"{list(BATCH_KEYS)}); samples > 1 and ensembles need it"
        )

    def rep(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.repeat(times, *([1] * (value.dim() - 1)))
        return value

    new_args = tuple(rep(v) for v in args)
    new_kwargs = {k: (v if k in _NOT_BATCHED else rep(v)) for k, v in kwargs.items()}
    # transformers' Trainer normalises causal-LM losses by the token count it passes in; the repeated batch holds
    # `times` as many tokens, and the loss must stay the mean over members.
    n_items = kwargs.get("num_items_in_batch")
    if n_items is not None:
        new_kwargs["num_items_in_batch"] = n_items * times
    return new_args, new_kwargs


def split_members(tensor: torch.Tensor, members: int) -> torch.Tensor:
    """View a member-major (members * batch, ...) output as (members, batch, ...)."""
    if tensor.shape[0] % members:
        raise ValueError(f"leading dimension {tensor.shape[0]} is not a multiple of members={members}")
    return tensor.view(members, tensor.shape[0] // members, *tensor.shape[1:])


DETACHED_BASE = (
    "its base model no longer belongs to it: another PeftModel was built on the same base model object (PEFT reuses "
    "the LoRA layers), or the adapter was unloaded (unload() / merge_and_unload()). LoRA Dropout was removed from "
    "its layers and hooks, which run plain PEFT; apply it to the model that owns the base now "
    "(loradrop.apply_lora_dropout or loradrop.from_pretrained)"
)
DETACHED_LAYER = (
    "another PeftModel was built on the same base model object (PEFT reused layer {name!r} for adapter {adapter!r}, "
    "e.g. PeftModel.from_pretrained(base, ...) or get_peft_model(base, ...) again). LoRA Dropout was removed from "
    "its layers and hooks, so the new model runs exactly as PEFT built it; apply LoRA Dropout to the new model "
    "(loradrop.apply_lora_dropout or loradrop.from_pretrained)"
)


class MemberController:
    """Per-model state of LoRA Dropout: the config, the adapted layers, the mask stream, and the plan of the current
    call.

    Args:
        config: the settings.
        layers: ``(module, adapter, handler)`` per adapted layer; layer ``i`` owns ``slices[i]``.
        slices: where each layer's mask features sit in the model-wide feature index.
        adapters: the adapter names LoRA Dropout runs on (stored with saved adapters).
        num_features: size of the feature index; by default the end of the last slice.
    """

    def __init__(
        self,
        config: LoraDropoutConfig,
        layers: Sequence[tuple[torch.nn.Module, str, Any]] = (),
        slices: Sequence[FeatureSlices] = (),
        adapters: Sequence[str] = (),
        *,
        num_features: int | None = None,
    ) -> None:
        if len(layers) != len(slices):
            raise ValueError(f"one FeatureSlices per layer is needed, got {len(layers)} layers and {len(slices)}")
        self.config = config
        self.adapters: list[str] = list(adapters)
        self.layers: list[tuple[torch.nn.Module, str, Any]] = list(layers)
        self.slices: list[FeatureSlices] = list(slices)
        if num_features is None:
            ends = [rng[1] for s in self.slices for rng in (s.a, s.b, s.rank) if rng is not None]
            num_features = max(ends, default=0)
        if config.seed is None:
            # Drawn from torch's global generator so that torch.manual_seed makes runs reproducible.
            self.seed = int(torch.randint(0, 2**62, (1,)).item())
        else:
            self.seed = config.seed
        self.num_features = num_features
        self.step = 0  # training forward calls so far: the counter in the mask key
        self.ranks = (0, 1)  # (rank, world size) of the data-parallel group, set when the stream is synchronised
        self._stream_synced = False  # (seed, step) broadcast from rank 0 yet (distributed.py)
        self.ensemble_calls = 0
        self.eval_mode = config.eval_mode
        self._depth = 0
        self._plan: CallPlan | None = None
        # (key, members per call or None for one per row, member offset, batch repeats)
        self._ensemble: tuple[int, int | None, int, int] | None = None
        self._chunk: tuple[int, int, int] | None = None  # (training step key, member offset, members)
        self._index_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._mask_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        # All layers' masked A/B copies of a call (and their reuse under no_grad)
        self.precompute = WeightPrecompute(config, self.layers, self.slices)
        # Ownership (set by `model.apply_lora_dropout` through `bind`): the base model and the PEFT tuner's config
        # dict that PEFT stores on it (``base.peft_config``). PEFT replaces that dict when another PeftModel is built
        # on the same base and deletes it on unload(), so one identity check per model call tells whether the layers
        # still belong to this model; `detach` then removes every trace of LoRA Dropout (docs/COVERAGE.md, "Reload").
        self.detached: str | None = None
        self._base: Any = None
        self._owner_config: Any = None
        self._on_detach: Any = None  # model.py's cleanup, called once with (controller, reason)
        self.injecting = 0  # > 0 while the owning model's tuner creates an adapter (its own, not another model's)

    def bind(self, base: torch.nn.Module, owner_config: Any, on_detach: Any) -> None:
        """Tie the controller to the base model whose ``peft_config`` is `owner_config` (its PeftModel's)."""
        self._base, self._owner_config, self._on_detach = base, owner_config, on_detach

    def owns_base(self) -> bool:
        """Whether the base model still belongs to this controller's PeftModel (always, when unbound)."""
        return self._base is None or self._base.__dict__.get("peft_config") is self._owner_config

    def detach(self, reason: str) -> None:
        """Stop for good: the model's layers and hooks lose every trace of LoRA Dropout (they run plain PEFT)."""
        if self.detached is not None:
            return
        self.detached = reason
        self._plan = None
        self._mask_cache = None
        self.precompute.clear()
        if self._on_detach is not None:
            self._on_detach(self, reason)

    # ----------------------------------------------------------------------------------------------- state
    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy: merged exports, Trainer internals) starts without the last call's plan and caches:
        # they describe a call of the original model, and after a training call the plan's masked weights are inside
        # the autograd graph, which cannot be deep-copied.
        state = self.__dict__.copy()
        state.update(_depth=0, _plan=None, _mask_cache=None, _index_cache={})
        return state

    def state_dict(self) -> dict[str, int]:
        """The mask stream's position: save it with a training checkpoint to resume with the same masks."""
        return {"seed": self.seed, "step": self.step, "ensemble_calls": self.ensemble_calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in ("seed", "step"):
            if not isinstance(state.get(name), int) or state[name] < 0:
                raise ValueError(f"loradrop state needs a non-negative integer {name!r}, got {state.get(name)!r}")
        self.seed, self.step = state["seed"], state["step"]
        self._stream_synced = False  # several ranks: rank 0's position is broadcast again at the next training call
        self.ensemble_calls = int(state.get("ensemble_calls", 0))

    # ----------------------------------------------------------------------------------------------- hooks
    # The hooks run outside torch.compile graphs (one graph break at the model's entry, none per layer): they keep
    # Python counters and draw the call's masks, so compiled graphs never specialise on a step number.
    @torch.compiler.disable
    def pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        if self._depth == 0 and not self.owns_base():  # unload(), or another PeftModel built on the same base
            self.detach(DETACHED_BASE)
            return None
        self._depth += 1
        if self._depth > 1:  # an inner hooked module of the same call: the outer one already planned it
            return None
        if self._ensemble is not None:
            key, members, offset, repeats = self._ensemble
            plan = CallPlan(masked=True, training=module.training, key=key, members=members, member_offset=offset)
        elif not module.training:
            self._plan = CallPlan(masked=False, training=False)
            return None
        elif self._chunk is not None:  # one chunk of a training step's members (see `member_chunks`)
            key, offset, repeats = self._chunk
            plan = CallPlan(masked=True, training=True, key=key, members=repeats, member_offset=offset)
        else:
            repeats = self.config.samples
            key = self._next_train_key()
            if self.config.mask_scope == "batch":  # every rank draws the same members (distributed.py)
                plan = CallPlan(masked=True, training=True, key=key, members=repeats)
            else:  # one member per row, keyed by the row's index in the global batch
                rank, world = self.ranks
                plan = CallPlan(masked=True, training=True, key=key, members=None,
                                ranks=(rank, world, repeats) if world > 1 else None)
        batch = batch_size_of(args, kwargs)
        self._plan = self._with_masks(plan, None if batch is None else batch * repeats)
        return repeat_batch(args, kwargs, repeats) if repeats > 1 else None

    @torch.compiler.disable
    def post_hook(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        # Runs even when the forward raised (always_call=True), so the depth never gets stuck.
        # The plan is kept: activation-checkpointing recomputes layers during backward and must see the same masks.
        self._depth = max(0, self._depth - 1)
        return None

    def _with_masks(self, plan: CallPlan, rows: int | None) -> CallPlan:
        """The plan with its masks drawn on the adapters' device and dtype (read from the first adapted layer)."""
        if self.config.p == 0 or not self.layers:
            return plan
        module, adapter, handler = self.layers[0]
        weight = handler.b_tensors(module, adapter)[0]
        if self.config.strategy == "input":
            # derive_key(key, STREAM_INPUT, layer) folds its parts one by one: fold the first two here, the layer
            # index in the layer (as tensor ops, see masks.fold_key).
            # torch.full writes the value with a fill kernel: no host-to-device copy, so no synchronisation.
            return replace(plan, input_key=torch.full((), derive_key(plan.key, STREAM_INPUT), dtype=torch.int64,
                                                      device=weight.device))
        members = plan.members if plan.members is not None else rows
        if members is None:
            return plan
        mask = self.masks(plan, members, weight.device, weight.dtype)
        return replace(plan, mask=mask, weights=self.precompute(mask))

    # ----------------------------------------------------------------------------------------------- plans
    def plan_for(self, layer_training: bool) -> CallPlan:
        """The plan an adapted layer follows; also valid when a layer is called outside a hooked model call."""
        plan = self._plan
        if plan is not None and (plan.training == layer_training or self._ensemble is not None):
            return plan
        if layer_training:
            key = derive_key(self.seed, STREAM_TRAIN, self.step)
            members = 1 if self.config.mask_scope == "batch" else None
            return CallPlan(masked=True, training=True, key=key, members=members)
        return CallPlan(masked=False, training=False)

    def masks(self, plan: CallPlan, members: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Keep-masks of every registered feature for the plan's members: a (members, num_features) tensor.

        Drawn once per call (and device/dtype) for all layers at once; layers take their slices.
        """
        mask = plan.mask
        if mask is not None and mask.shape[0] == members and mask.device == device and mask.dtype == dtype:
            return mask  # drawn by the pre-hook for this call
        cache_key = (plan.key, plan.member_offset, members, plan.ranks, device, dtype)
        if self._mask_cache is not None and self._mask_cache[0] == cache_key:
            return self._mask_cache[1]
        features = self.index(self.num_features, device)
        if plan.ranks is not None:
            member_ids = global_member_ids(members, plan.ranks[2], plan.ranks[0], plan.ranks[1], device)
        else:
            member_ids = self.index(members, device, offset=plan.member_offset)
        mask = keep_mask(plan.key, member_ids, features, self.config.p, keep_value=self.config.keep_scale,
                         dtype=dtype)
        self._mask_cache = (cache_key, mask)
        return mask

    def index(self, size: int, device: torch.device, offset: int = 0) -> torch.Tensor:
        """``arange(offset, offset + size)`` as int64 on `device`, cached (a few sizes per model recur every call)."""
        cache_key = (size, offset, device)
        ids = self._index_cache.get(cache_key)
        if ids is None:
            if len(self._index_cache) > 64:  # sizes vary with batch and sequence length: keep the cache small
                self._index_cache.clear()
            ids = self._index_cache[cache_key] = torch.arange(offset, offset + size, device=device, dtype=torch.int64)
        return ids

    @property
    def expected_factor(self) -> float:
        """Factor on the update in a plain eval forward (and in merges/exports)."""
        return self.config.expected_factor if self.eval_mode == "expected" else 1.0

    @property
    def expected_bias_factor(self) -> float:
        """Factor on lora_B's bias (PEFT ``lora_bias``) in a plain eval forward and in merges/exports."""
        return self.config.expected_bias_factor if self.eval_mode == "expected" else 1.0

    # ----------------------------------------------------------------------------------------------- member chunks
    def _next_train_key(self) -> int:
        """The mask key of the next training step; advances the step counter (once per step, chunked or not)."""
        if not self._stream_synced:
            rank, world = data_parallel_rank()
            if world > 1:  # several ranks: all continue rank 0's stream (a seed drawn per process, a partial resume)
                self.seed, self.step = broadcast_stream(self.seed, self.step)
                self.ranks, self._stream_synced = (rank, world), True
        key = derive_key(self.seed, STREAM_TRAIN, self.step)
        self.step += 1
        return key

    def member_chunks(self) -> Iterator[tuple[int, int]]:
        """One training step whose members run in chunks (``config.member_chunk``): yields (offset, members) per
        chunk; every model call inside the loop body runs that chunk's members of THIS step (same key, member ids
        offset, offset+1, ...), so masks equal those of the one-call step. The step counter advances once."""
        if self._ensemble is not None or self._chunk is not None:
            raise RuntimeError("loradrop member chunks cannot be nested in an ensemble or another chunk loop")
        key = self._next_train_key()
        try:
            for offset, size in self.config.chunks:
                self._chunk = (key, offset, size)
                yield offset, size
        finally:
            self._chunk = None

    # ----------------------------------------------------------------------------------------------- ensembles
    def ensemble_key(self, seed: int | None) -> int:
        if seed is None:
            self.ensemble_calls += 1
            return derive_key(self.seed, STREAM_ENSEMBLE, self.ensemble_calls, 1)
        return derive_key(seed, STREAM_ENSEMBLE, 0, 0)

    @contextlib.contextmanager
    def ensemble(self, key: int, members: int | None, offset: int, repeats: int | None = None) -> Iterator[None]:
        """Within this block every model call runs masked members with ids offset, offset+1, ... under `key`.

        `members` members share the batch repeated `repeats` (default: `members`) times; ``members=None`` gives
        every row its own member (example scope), which also replays one member of a training call exactly.
        """
        if self._ensemble is not None:
            raise RuntimeError("loradrop ensembles cannot be nested")
        if repeats is None:
            repeats = members if members is not None else 1
        self._ensemble = (key, members, offset, repeats)
        try:
            yield
        finally:
            self._ensemble = None
            self._plan = None
            self._mask_cache = None
            self.precompute.clear()
