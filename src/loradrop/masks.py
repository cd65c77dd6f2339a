"""Counter-based mask drawing.

Every keep/drop decision is a pure function of ``(seed, stream, counter, member, feature)``: a 32-bit integer hash
evaluated with vectorised tensor ops on the model's device. So

- masks do not depend on how members are chunked or how the batch is split (the member index is part of the key),
- no generator state has to be threaded through layers, and there is no host synchronisation,
- CPU and GPU draw identical masks for the same key.

All masks of one call are drawn over one model-wide feature index; `FeatureSlices` says where each adapted layer's
features sit in it.

All integer arithmetic stays below 2**63 (32-bit values times constants below 2**31), so int64 never overflows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D  # multipliers of a "lowbias32"-style finaliser, both < 2**31
_M2 = 0x2C1B3C6D
_MEMBER_STRIDE = 0x9E3779B1
_FEATURE_STRIDE = 0x85EBCA77

STREAM_TRAIN = 1
STREAM_ENSEMBLE = 2
STREAM_INPUT = 3


def _mix32_int(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The same finaliser as `_mix32_int`, element-wise on an int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def derive_key(*parts: int) -> int:
    """Fold any number of non-negative integers (each may exceed 32 bits) into one 32-bit key."""
    h = 0x6A09E667
    for part in parts:
        part = int(part)
        if part < 0:
            raise ValueError(f"key parts must be non-negative, got {part}")
        while True:  # feed 32 bits at a time so large seeds and counters keep all their bits
            h = _mix32_int((h ^ (part & MASK32)) + 0x9E3779B9)
            part >>= 32
            if part == 0:
                break
    return h


def fold_key(key: torch.Tensor, part: int) -> torch.Tensor:
    """``derive_key(k, ..., part)`` from the int64 tensor holding ``derive_key(k, ...)``: one more fold, as tensor ops
    (so a compiled graph takes the key as data, not as a constant). `part` must be below 2**32."""
    return _mix32(((key ^ part) + 0x9E3779B9) & MASK32)


def uniform(key: int | torch.Tensor, members: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers of shape (len(members), len(features)) for one key.

    `members` and `features` are int64 index tensors on the target device; `key` is an int or a 0-dim int64 tensor
    on that device.
    """
    per_member = _mix32((key ^ (members * _MEMBER_STRIDE)) & MASK32)
    h = _mix32((per_member[:, None] + features[None, :] * _FEATURE_STRIDE) & MASK32)
    # 24 high bits -> exactly representable float32 in [0, 1)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def keep_mask(
    key: int | torch.Tensor,
    members: torch.Tensor,
    features: torch.Tensor,
    p: float,
    *,
    keep_value: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A (members, features) mask: `keep_value` with probability 1-p, else 0."""
    kept = uniform(key, members, features) >= p
    return kept.to(dtype) * keep_value if keep_value != 1.0 else kept.to(dtype)


# ------------------------------------------------------------------------------------------------ the feature index
@dataclass(frozen=True)
class FeatureSlices:
    """Where one adapted layer's mask entries live in the model-wide feature index."""

    layer_index: int
    a: tuple[int, int] | None = None  # input features: columns of A
    b: tuple[int, int] | None = None  # output features: rows of B
    rank: tuple[int, int] | None = None  # rank components: rows of A


def plan_slices(strategy: str, layer_index: int, offset: int, in_features: int, out_features: int,
                rank: int) -> tuple[FeatureSlices, int]:
    """Allocate this layer's mask features starting at `offset`; return the slices and the next free offset."""
    if strategy == "ab":
        a, b = (offset, offset + in_features), (offset + in_features, offset + in_features + out_features)
        return FeatureSlices(layer_index, a=a, b=b), b[1]
    if strategy == "a":
        return FeatureSlices(layer_index, a=(offset, offset + in_features)), offset + in_features
    if strategy == "b":
        return FeatureSlices(layer_index, b=(offset, offset + out_features)), offset + out_features
    if strategy == "rank":
        return FeatureSlices(layer_index, rank=(offset, offset + rank)), offset + rank
    return FeatureSlices(layer_index), offset  # "input": drawn per element, nothing shared
