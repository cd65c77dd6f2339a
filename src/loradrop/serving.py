"""Serve the ensemble with any multi-LoRA server: `export_members` writes n masked members as ordinary PEFT adapters,
`aggregate_member_probs` averages what the server returns for them.

Member m of ``ensemble_predict(model, batch, n, seed=seed)`` multiplies by masked copies of A and B (columns of A,
rows of B, or rank components, with any 1/(1-p) rescaling). Those copies are plain LoRA weights, so each member is
written as an adapter with the masked A and B in place of the originals and the unchanged LoRA config: PEFT
(``load_adapter`` per member, then one mixed batch with ``adapter_names=[...]``), vLLM, SGLang or LoRAX can run all n
members in one batch, and averaging their probabilities on the client reproduces the ensemble.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layers import LoraLinearHandler
from .members import CallPlan
from .model import get_active_controller, staged_folder

MEMBERS_FILE = "loradrop_members.json"
_FOLDABLE = ("ab", "a", "b", "rank")


def _masked_factors(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, slices: Any,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One member's (features,) keep-mask folded into a layer's original lora_A, lora_B (and lora_B's bias)."""
    if slices.a is not None:
        a = a * mask[None, slices.a[0]:slices.a[1]]
    if slices.rank is not None:
        a = a * mask[slices.rank[0]:slices.rank[1], None]
    if slices.b is not None:
        b = b * mask[slices.b[0]:slices.b[1], None]
        if bias is not None:
            bias = bias * mask[slices.b[0]:slices.b[1]]
    return a, b, bias


def member_masks(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    """The (n, features) keep-masks of ``ensemble_predict(model, ..., n, seed=seed)``'s members."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"export_members needs an integer seed (the members of ensemble_predict(seed=...)), got "
                         f"{seed!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (members) must be an integer >= 1, got {n!r}")
    controller = get_active_controller(model, "export_members")
    if controller.config.strategy not in _FOLDABLE:
        raise ValueError(f"strategy {controller.config.strategy!r} drops activations, not weights: its members cannot "
                         f"be written as adapters (foldable strategies: {list(_FOLDABLE)})")
    module, adapter, handler = controller.layers[0]
    weight = handler.b_tensors(module, adapter)[0]
    plan = CallPlan(masked=True, training=False, key=controller.ensemble_key(seed), members=n)
    return controller.masks(plan, n, weight.device, weight.dtype)


def export_members(model: nn.Module, n: int, out_dir: str | os.PathLike[str], seed: int) -> list[Path]:
    """Write members 0..n-1 of the seeded ensemble as plain PEFT adapters ``out_dir/member_{i}`` (masks and
    rescaling folded into lora_A and lora_B; the LoRA config, and with it the scaling, unchanged) plus
    ``out_dir/loradrop_members.json``. The model is left as it was. Returns the member folders.

    Serving: load each folder as an adapter named ``member_i`` and run the batch once per member (PEFT's mixed-batch
    ``adapter_names``, or a multi-LoRA server); `aggregate_member_probs` averages the results.
    """
    controller = get_active_controller(model, "export_members")
    masks = member_masks(model, n, seed)
    for module, _, handler in controller.layers:
        if not isinstance(handler, LoraLinearHandler):
            raise ValueError(f"export_members writes plain LoRA linear layers; {type(module).__name__} is handled by "
                             f"{type(handler).__name__}")
    adapters = sorted({adapter for _, adapter, _ in controller.layers})
    if len(adapters) != 1:
        raise ValueError(f"export_members writes one adapter per member; LoRA Dropout runs on {adapters}")
    adapter = adapters[0]
    params = [(module, slices) for (module, _, _), slices in zip(controller.layers, controller.slices)]
    originals = [(module.lora_A[adapter].weight.data, module.lora_B[adapter].weight.data,
                  None if module.lora_B[adapter].bias is None else module.lora_B[adapter].bias.data)
                 for module, _ in params]
    out_dir = Path(out_dir)
    try:
        with staged_folder(out_dir) as tmp:
            for m in range(n):
                for (module, slices), (a, b, bias) in zip(params, originals):
                    a, b, bias = _masked_factors(a, b, bias, slices, masks[m])  # from the originals, every member
                    module.lora_A[adapter].weight.data = a
                    module.lora_B[adapter].weight.data = b
                    if bias is not None:
                        module.lora_B[adapter].bias.data = bias
                folder = tmp / f"member_{m}"
                # the class's own save_pretrained: no loradrop_config.json, these are plain adapters
                type(model).save_pretrained(model, str(folder), selected_adapters=[adapter],
                                            safe_serialization=True)
                if adapter != "default":  # PEFT writes a non-default adapter into a subfolder named after it
                    for item in (folder / adapter).iterdir():
                        os.replace(item, folder / item.name)
                    (folder / adapter).rmdir()
            cfg = controller.config
            info = {"n": n, "seed": seed, "members": [f"member_{m}" for m in range(n)], "adapter": adapter,
                    "p": cfg.p, "strategy": cfg.strategy, "rescale": cfg.rescale,
                    "note": "average the members' probabilities: loradrop.serving.aggregate_member_probs"}
            (tmp / MEMBERS_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    finally:
        for (module, _), (a, b, bias) in zip(params, originals):
            module.lora_A[adapter].weight.data = a
            module.lora_B[adapter].weight.data = b
            if bias is not None:
                module.lora_B[adapter].bias.data = bias
    return [out_dir / f"member_{m}" for m in range(n)]


def aggregate_member_probs(member_probs: Sequence[Any] | torch.Tensor, *, log: bool = False) -> dict[str, torch.Tensor]:
    """Average n members' probabilities (a list of (B, ..., C) arrays, or one (n, B, ..., C) tensor), e.g. the
    class probabilities or next-token distributions a server returned per member adapter. ``log=True``: the inputs
    are log-probabilities (a server's logprobs; over a truncated top-k they are renormalised per member first).

    Returns "probs" (the mean), "member_probs", "entropy", "expected_entropy" and "mutual_information", as
    `ensemble_predict` does.
    """
    members = torch.stack([torch.as_tensor(p, dtype=torch.float64) for p in member_probs]) \
        if not isinstance(member_probs, torch.Tensor) else member_probs.to(torch.float64)
    if members.dim() < 2 or members.shape[0] < 1:
        raise ValueError(f"member_probs must stack to (n, ..., classes), got shape {tuple(members.shape)}")
    if log:
        members = members.softmax(-1)
    probs = members.mean(0)

    def ent(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)

    total, expected = ent(probs), ent(members).mean(0)
    return {"probs": probs, "member_probs": members, "entropy": total, "expected_entropy": expected,
            "mutual_information": (total - expected).clamp_min(0.0)}
