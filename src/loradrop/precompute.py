"""Every adapted layer's masked A and B for one call, built at once (the per-call half of the hot path).

When the GPU waits on the host (small batches), per-layer operators are what a step pays for. So instead of each
layer slicing the call's (members, features) keep-mask and multiplying its own weights, the model's pre-hook builds
all layers' masked copies with one mask-scale multiply, two ``torch.split`` calls and two ``torch._foreach_mul``
calls for the whole model, and each layer only runs its two matmuls (see docs/DESIGN.md, "The hot path").

`WeightPrecompute` is owned by a `members.MemberController` and holds its own state: the layout of the feature
index (built on first use), the cached per-feature scaling vector and, under ``no_grad``, the last call's copies.
It knows layers only through the controller's ``(module, adapter, handler)`` triples and `masks.FeatureSlices`; it
imports no other loradrop module but `distributed` (to recognise sharded parameters).

Sharded models (FSDP2, DeepSpeed ZeRO-3): outside a layer's own forward its weights are shards, so the pre-hook must
not read them as full weights. Each call checks one weight, the first precomputed one: a shard means "every layer
masks its own weights inside its forward, after FSDP / DeepSpeed gathered them" (no gather here); a different
object than the cached layout holds (FSDP2's ``fully_shard`` replaces the parameters) rebuilds the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .distributed import is_sharded
from .masks import FeatureSlices

NO_GRAD_PRECOMPUTE_ELEMENTS = 1 << 26  # 256 MiB of float32 masked copies held at once under no_grad


@dataclass
class Layout:
    """Where every precomputable layer's mask pieces sit in the feature index."""

    sizes: list[int]  # lengths of consecutive feature ranges covering [0, F)
    a_layers: list[int]  # layer indices whose A side is masked (columns of A, or rows of A for "rank")
    a_weights: list[torch.Tensor]
    a_pieces: list[int]  # index into the split pieces
    a_rows: bool  # "rank": the A-side mask multiplies rows (a column view of the mask)
    b_layers: list[int]
    b_weights: list[torch.Tensor]
    b_pieces: list[int]
    scaled_side: str  # "a" or "b": the side that carries each layer's scaling
    count: int  # number of layers


def build_layout(strategy: str, layers: Sequence[tuple[Any, str, Any]],
                 slices: Sequence[FeatureSlices]) -> Layout | None:
    """The layout of `layers` (``(module, adapter, handler)``) whose features sit at `slices`; None when the slices
    do not cover the feature index contiguously (then every layer masks its own weights)."""
    ranges: list[tuple[int, int, int, str]] = []  # (start, end, layer, side)
    for layer, layer_slices in enumerate(slices):
        for side, rng in (("a", layer_slices.a), ("a", layer_slices.rank), ("b", layer_slices.b)):
            if rng is not None:
                ranges.append((rng[0], rng[1], layer, side))
    ranges.sort()
    if not ranges or ranges[0][0] != 0 or any(r[1] != n[0] for r, n in zip(ranges, ranges[1:])):
        return None
    layout = Layout(sizes=[r[1] - r[0] for r in ranges], a_layers=[], a_weights=[], a_pieces=[],
                    a_rows=strategy == "rank", b_layers=[], b_weights=[], b_pieces=[],
                    scaled_side="b" if strategy == "b" else "a", count=len(layers))
    for piece, (_, _, layer, side) in enumerate(ranges):
        module, adapter, handler = layers[layer]
        weights = handler.precompute_weights(module, adapter)
        if weights is None:
            continue
        if side == "a":
            layout.a_layers.append(layer)
            layout.a_weights.append(weights[0])
            layout.a_pieces.append(piece)
        else:
            layout.b_layers.append(layer)
            layout.b_weights.append(weights[1])
            layout.b_pieces.append(piece)
    return layout


class WeightPrecompute:
    """All layers' masked A/B copies of one call, with the layer's ``scaling`` folded into one side.

    Call it with the call's (members, features) keep-mask; it returns, per layer index, ``[masked A or None,
    masked B or None]`` (to be used with ``scaling=1``), None for a layer whose handler cannot precompute (AdaLoRA,
    ``lora_bias``), or None overall when nothing can be precomputed. `layers` and `slices` are the controller's
    lists; `config` is read for the strategy when the layout is first built.
    """

    def __init__(self, config: Any, layers: Sequence[tuple[Any, str, Any]], slices: Sequence[FeatureSlices]) -> None:
        self._config = config
        self._layers = layers
        self._slices = slices
        self._layout: Layout | bool | None = None  # None: not built yet; False: nothing to precompute
        self._scale_cache: tuple[Any, torch.Tensor] | None = None  # (scalings, device, dtype) -> scale vector
        # The last call's copies, reused by the next call under no_grad while its mask and the weights (version
        # counters) are unchanged: every decode step of ensemble_generate.
        self._weights_cache: tuple[Any, ...] | None = None

    # ----------------------------------------------------------------------------------------------- state
    def __getstate__(self) -> dict[str, Any]:
        # A copy rebuilds its layout and caches from its own (copied) layers on first use.
        state = self.__dict__.copy()
        state.update(_layout=False if self._layout is False else None, _scale_cache=None, _weights_cache=None)
        return state

    def disable(self) -> None:
        """Never precompute again: every layer masks its own weights (the reference path, for tests and debugging)."""
        self._layout = False
        self._weights_cache = None

    def clear(self) -> None:
        """Drop the copies held for reuse (the end of an ensemble block)."""
        self._weights_cache = None

    @property
    def holds_copies(self) -> bool:
        """Whether masked copies are held for reuse by the next no_grad call."""
        return self._weights_cache is not None

    @property
    def layout(self) -> Layout | None:
        if self._layout is None:
            self._layout = build_layout(self._config.strategy, self._layers, self._slices) or False
        return self._layout or None

    # ----------------------------------------------------------------------------------------------- per call
    def _scale_vector(self, layout: Layout, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(F,): the layer's scaling on the scaled side of every precomputed layer, 1 elsewhere (cached until a
        scaling changes), so the layers' matmuls need no separate scale or alpha. The mask already holds keep_scale."""
        layers = layout.a_layers if layout.scaled_side == "a" else layout.b_layers
        pieces = layout.a_pieces if layout.scaled_side == "a" else layout.b_pieces
        scalings = tuple(float(self._layers[i][0].scaling[self._layers[i][1]]) for i in layers)
        key = (scalings, device, dtype)
        if self._scale_cache is not None and self._scale_cache[0] == key:
            return self._scale_cache[1]
        starts = [0]
        for size in layout.sizes:
            starts.append(starts[-1] + size)
        values = torch.ones(starts[-1], dtype=torch.float64)
        for piece, scaling in zip(pieces, scalings):
            values[starts[piece]:starts[piece + 1]] *= scaling
        vector = values.to(device=device, dtype=dtype)
        self._scale_cache = (key, vector)
        return vector

    def __call__(self, mask: torch.Tensor) -> list[Any] | None:
        layout = self._layout
        if layout is None:
            layout = self.layout
        if not layout or not (layout.a_layers or layout.b_layers):
            return None
        # one weight per call tells whether the layout is stale or the parameters are sharded (see the module doc)
        side, layer = (0, layout.a_layers[0]) if layout.a_layers else (1, layout.b_layers[0])
        anchor = (layout.a_weights or layout.b_weights)[0]
        module, adapter, handler = self._layers[layer]
        current = handler.precompute_weights(module, adapter)
        if current is None or current[side] is not anchor:  # parameters replaced: rebuild the layout once
            self._layout, self._weights_cache = None, None
            layout = self.layout
            if not layout or not (layout.a_layers or layout.b_layers):
                return None
            anchor = (layout.a_weights or layout.b_weights)[0]
        if is_sharded(anchor):
            return None
        weights_all = layout.a_weights + layout.b_weights
        if any(w.device != mask.device or w.dtype != mask.dtype for w in weights_all):
            return None  # mixed devices or dtypes: each layer masks its own weights
        versions = None
        if not torch.is_grad_enabled():
            # Without autograd each layer's copies would be transient; holding all of them costs M x (LoRA
            # parameters). Past a budget, let each layer build and free its own (large ensembles of large adapters).
            if mask.shape[0] * sum(w.numel() for w in weights_all) > NO_GRAD_PRECOMPUTE_ELEMENTS:
                return None
            # reuse the last call's copies while mask and weights are unchanged (every decode step of a generation)
            versions = (id(mask), tuple(w._version for w in weights_all))
            cached = self._weights_cache
            if cached is not None and cached[0] == versions:
                return cached[1]
        scaled = mask * self._scale_vector(layout, mask.device, mask.dtype)
        out: list[Any] = [None] * layout.count
        masked_a = masked_b = []
        if layout.a_layers:
            view = scaled[:, :, None] if layout.a_rows else scaled[:, None, :]
            pieces = torch.split(view, layout.sizes, dim=1 if layout.a_rows else 2)
            masked_a = torch._foreach_mul(layout.a_weights, [pieces[i] for i in layout.a_pieces])
        if layout.b_layers:
            pieces = torch.split(scaled[:, :, None], layout.sizes, dim=1)
            masked_b = torch._foreach_mul(layout.b_weights, [pieces[i] for i in layout.b_pieces])
        for layer in layout.a_layers + layout.b_layers:
            out[layer] = [None, None]
        for layer, a in zip(layout.a_layers, masked_a):
            out[layer][0] = a
        for layer, b in zip(layout.b_layers, masked_b):
            out[layer][1] = b
        if versions is not None:
            self._weights_cache = (versions, out, mask)  # the mask is kept alive so its id stays unique
        return out
