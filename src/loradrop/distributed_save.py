"""Saving an adapter whose parameters are sharded or replicated over several processes (FSDP2, DDP).

`save_adapter` gathers the *trainable* parameters only (the LoRA adapter, plus any ``modules_to_save``), never the
frozen base model, through torch's own distributed state-dict API, and rank 0 writes a standard PEFT adapter with
``loradrop_config.json`` (settings and the mask stream's position) beside it. The folder loads with
`loradrop.from_pretrained` on any number of processes; the mask stream continues from the saved position
(docs/SCALING.md, "Checkpoints").

Under accelerate's FSDP plugin with the Trainer, ``fsdp_state_dict_type: FULL_STATE_DICT`` (the committed configs in
``configs/accelerate``) makes the Trainer's own checkpoints do the same gathering before ``save_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .distributed import data_parallel_rank, is_sharded
from .model import get_controller


def _peft_model(model: nn.Module) -> nn.Module:
    """The PeftModel inside DDP / torch.compile wrappers (FSDP2's ``fully_shard`` keeps the module itself)."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def save_adapter(model: nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Save `model`'s adapter as a standard PEFT folder plus ``loradrop_config.json``, gathered from all ranks.

    A collective when torch.distributed is initialised with several ranks: every rank must call it (rank 0 writes,
    the others wait at a barrier). In one process without sharded parameters it is ``model.save_pretrained``.
    """
    folder = Path(folder)
    peft_model = _peft_model(model)
    get_controller(peft_model)  # a clear error for a model without LoRA Dropout, before any collective
    rank, world = data_parallel_rank()
    if world == 1 and not any(is_sharded(p) for p in peft_model.parameters()):
        peft_model.save_pretrained(str(folder))
        return folder
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict + cpu_offload: the full tensors land on rank 0 only (in CPU memory); frozen (base) parameters
    # are skipped, so only the adapter is ever gathered.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(peft_model, options=options)
    if rank == 0:
        peft_model.save_pretrained(str(folder), state_dict=state)
    torch.distributed.barrier()
    return folder
