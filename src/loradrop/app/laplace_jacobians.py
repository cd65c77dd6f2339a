"""Per-example Jacobians of a LoRA classifier's logits with respect to its LoRA factors, for the Laplace-LoRA
predictive (`laplace_baseline`), in one or a few backward passes over a whole batch.

laplace-torch's own ``backend.jacobians`` (``torch.func.jacrev``) differentiates the whole ``(batch, C)`` output:
batch·C backward passes, each through the whole batch. `laplace_baseline._moments` therefore took them one example
at a time (C passes through that example alone): for the commonsense study's cloze-scored SmolLM2 runs (thousands
of test and OOD questions each) a long series of tiny passes, launch-bound on a GPU. On a 2-core CPU (real SmolLM2,
32 WinoGrande-S questions) the Jacobians take 11.5 s this way against 20.2 s that way, equal to 1e-5
(`benchmarks/laplace_jacobians.py`, `benchmarks/results/laplace/jacobians_cpu.json`).

Here the Jacobians come from the per-sample-gradient identity that Opacus and asdl use: every trainable parameter is
the weight of an ``nn.Linear`` (the LoRA factors ``lora_A`` / ``lora_B``), and for a linear layer the gradient of a
sum of per-row outputs splits by row into ``Σ_t g[r, t] ⊗ x[r, t]`` (``x``: the layer's input, ``g``: the gradient at
its output), because rows never interact in a transformer. So

- in **cloze** form (`_ClozeLogits`: one LM row per choice, each choice's logit a function of its own row) a single
  backward pass of the sum of all present logits gives every Jacobian of the batch;
- otherwise (a classifier or letter-scored LM: the C logits of an example share its row) C passes, one per class.

Hand-written (about 60 lines) rather than through asdl's ``batch_gradient``, which materialises a gradient per token
(rows · positions · parameters: tens of GB for one SmolLM2 batch) before summing over positions. Anything these
hooks cannot cover (a trainable bias, a parameter outside an ``nn.Linear``, a module used twice in one forward) makes
`hooked_jacobians` return ``None``, and the caller falls back to laplace-torch's one-example-at-a-time path.
Checked in ``tests/app/test_laplace_baseline.py``: against laplace-torch's Jacobians (a classifier) and against
autograd one logit at a time (cloze form)."""

from __future__ import annotations

from typing import Any

import torch


class _Unsupported(Exception):
    """A model or batch the per-row hooks do not cover (the caller falls back to laplace-torch)."""


def _owners(net: torch.nn.Module) -> list[tuple[torch.nn.Linear, torch.Tensor]] | None:
    """The trainable parameters in ``net.named_parameters()`` order (laplace-torch's), each with the ``nn.Linear``
    whose weight it is; None when one is not such a weight or a Linear also has a trainable bias."""
    linears = {id(m.weight): m for m in net.modules() if isinstance(m, torch.nn.Linear)}
    out = []
    for _, param in net.named_parameters():
        if not param.requires_grad:
            continue
        module = linears.get(id(param))
        if module is None or (module.bias is not None and module.bias.requires_grad):
            return None
        out.append((module, param))
    return out or None


def hooked_jacobians(net: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(Jacobians (batch, C, parameters), logits (batch, C))`` of `net` on `batch`, laplace-torch's layout and
    parameter order, or None when the hooks do not cover `net` (see the module docstring). A cloze batch (with
    ``row_slots``) takes one backward pass; any other, one per class."""
    owners = _owners(net)
    if owners is None:
        return None
    saved: dict[int, list[Any]] = {}  # id(module) -> [input, gradient at the output]

    def forward_hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if id(module) in saved or not output.requires_grad:
            raise _Unsupported  # used twice in one forward (weights shared): rows no longer map to one call
        entry = saved[id(module)] = [inputs[0].detach(), None]
        output.register_hook(lambda grad: entry.__setitem__(1, grad.detach()))

    handles = [module.register_forward_hook(forward_hook) for module, _ in owners]
    params = [param for _, param in owners]
    try:
        with torch.enable_grad():
            logits = net(batch)
            cloze = "row_slots" in batch
            sums = [logits.masked_fill(~batch["choice_mask"].to(logits.device).bool(), 0.0).sum()] if cloze else \
                [logits[:, k].sum() for k in range(logits.shape[1])]
            passes = []
            for i, total in enumerate(sums):
                for entry in saved.values():
                    entry[1] = None
                if total.requires_grad:
                    torch.autograd.grad(total, params, retain_graph=i < len(sums) - 1, allow_unused=True)
                passes.append(_per_row(owners, saved))
    except _Unsupported:
        return None
    finally:
        for handle in handles:
            handle.remove()
    f = logits.detach().float()
    if cloze:
        slots = batch["row_slots"].to(f.device)
        js = passes[0].new_zeros(f.numel(), passes[0].shape[1])
        js[slots] = passes[0]  # row r is choice slot b·C + c; absent choices (constant logits) stay 0
        return js.view(*f.shape, -1), f
    return torch.stack(passes, dim=1), f


def _per_row(owners: list[tuple[torch.nn.Linear, torch.Tensor]], saved: dict[int, list[Any]]) -> torch.Tensor:
    """``(rows, parameters)``: each row's gradient of the last backward pass, for every owner's weight in order."""
    rows = [entry[0].shape[0] for entry in saved.values()]
    if len(saved) != len(owners) or len(set(rows)) != 1:
        raise _Unsupported  # a LoRA factor the forward never used, or calls on different row counts
    parts = []
    for module, param in owners:
        x, grad = saved[id(module)]
        n = x.shape[0]
        if grad is None:  # no path from this pass's logits to the layer: a zero Jacobian
            parts.append(param.new_zeros(n, param.numel(), dtype=torch.float32))
            continue
        x, grad = x.reshape(n, -1, x.shape[-1]).float(), grad.reshape(n, -1, grad.shape[-1]).float()
        parts.append(torch.einsum("rto,rti->roi", grad, x).reshape(n, -1))
    return torch.cat(parts, dim=1)


__all__ = ["hooked_jacobians"]
