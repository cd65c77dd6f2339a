"""Several processes (DDP, FSDP2, DeepSpeed ZeRO): which masks each rank draws, and sharded adapter weights.

Mask semantics across data-parallel ranks (docs/SCALING.md), defined so that k ranks with local batch b train
exactly like one process with the global batch k*b (same masks, loss and gradients up to reduction order; tested by
``tests/test_distributed.py``):

- ``mask_scope="batch"``: every rank draws the same members in a step (one mask stream: same seed, same step counter,
  member ids 0..N-1), so the global batch sees the paper's one mask per member.
- ``mask_scope="example"``: every *global* example draws its own mask, keyed by its index in the global batch
  ``rank * b + i`` (member-major with ``samples=N``: ``m * k*b + rank * b + i``). The global batch of a step is the
  ranks' local batches one after another, which is how accelerate's data loader (and the Trainer) shards: rank r
  gets batch r of every k consecutive batches. Local batches must have equal sizes (accelerate's ``even_batches``,
  the default, and ``DistributedSampler`` pad to equal sizes).

The stream's position (seed, step) is broadcast from rank 0 at the first training call of a process group (and
again after `MemberController.load_state_dict`), so a seed drawn per process (``seed=None``), or a checkpoint read by
some ranks only, cannot make ranks disagree. That broadcast is the one collective loradrop issues; it runs inside the
first training forward, which every data-parallel rank executes.

Sharded parameters: under FSDP2 (``fully_shard``) the adapter weights are DTensor shards outside their layer's
forward, under DeepSpeed ZeRO-3 they are empty placeholders (``ds_id``). The all-layer precompute
(`precompute.WeightPrecompute`) then steps aside and every layer masks its own weights inside its forward, after
FSDP or DeepSpeed gathered them: nothing is gathered by loradrop, and there is no full-model gather. (ZeRO-3 gathers
``lora_A`` / ``lora_B`` for the LoRA layer's forward although the variant reads their weights without calling them;
checked on CPU with DeepSpeed 0.19.8 and gloo, docs/SCALING.md. Marking LoRA layers as ZeRO-3 "leaf" modules breaks
their backward there: don't.)

This module imports torch only (members.py and precompute.py import it).
"""

from __future__ import annotations

from typing import Any

import torch


def data_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when torch.distributed is not initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def broadcast_stream(seed: int, step: int) -> tuple[int, int]:
    """Rank 0's (seed, step), on every rank of the default process group (a collective: all ranks must call it)."""
    payload: list[Any] = [(int(seed), int(step))]
    # broadcast_object_list works on every backend (gloo on CPU; NCCL through the current CUDA device).
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


def global_member_ids(rows: int, repeats: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """Member ids of the `rows` local rows of an example-scope call on `rank` of `world`: the rows' positions in the
    global batch.

    The local call holds `repeats` copies (member-major) of a local batch of ``b = rows // repeats`` examples; row
    ``m*b + i`` is example ``rank*b + i`` of copy m, i.e. row ``m*(world*b) + rank*b + i`` of the same call made by
    one process on the global batch. With ``world == 1`` this is ``arange(rows)``, the single-process ids.
    """
    if rows % repeats:
        raise ValueError(f"{rows} rows are not a multiple of {repeats} repeats")
    local = rows // repeats
    copies = torch.arange(repeats, device=device, dtype=torch.int64)[:, None] * (world * local)
    return (copies + (rank * local + torch.arange(local, device=device, dtype=torch.int64))[None, :]).reshape(-1)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a parameter shard outside its layer's forward: an FSDP2 DTensor or a DeepSpeed ZeRO-3
    partitioned parameter (its full values exist only inside the owning module's forward)."""
    if hasattr(tensor, "ds_id"):  # DeepSpeed ZeRO-3 marks its partitioned parameters with ds_id / ds_status
        return True
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)

