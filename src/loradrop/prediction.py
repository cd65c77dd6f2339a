"""Prediction loops over a tokenized dataset: the single pass (eval mode, the expected update) and the test-time
ensemble, batch by batch, for sequence classification and regression heads. The ensemble is LoRA Dropout's masked
members (one batched pass) or, as a baseline, MC dropout: PEFT's element-wise ``lora_dropout`` kept on at test time,
one stochastic pass per sample."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .ensemble import batch_seed, ensemble_predict, eval_mode
from .model import get_active_controller


@dataclass
class Predictions:
    """Probabilities (classification) or values (regression) of the single pass and of the ensemble."""

    single: torch.Tensor
    ensemble: torch.Tensor | None
    labels: torch.Tensor | None
    mutual_information: torch.Tensor | None = None  # classification ensembles: epistemic uncertainty per example
    ensemble_std: torch.Tensor | None = None  # regression ensembles: the members' spread per example


@contextlib.contextmanager
def peft_dropout_on(model: nn.Module) -> Iterator[int]:
    """Switch PEFT's ``lora_dropout`` modules to training mode (the rest of the model as it is); yields how many."""
    modules = [m for name, m in model.named_modules() if isinstance(m, nn.Dropout) and ".lora_dropout." in
               f".{name}."]
    saved = [m.training for m in modules]
    for m in modules:
        m.train()
    try:
        yield sum(1 for m in modules if m.p > 0)
    finally:
        for m, was in zip(modules, saved):
            m.train(was)


@torch.no_grad()
def mc_dropout_predict(model: nn.Module, inputs: dict[str, Any], n: int, *, seed: int,
                       regression: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MC dropout: `n` passes with PEFT's lora_dropout on, in eval mode otherwise. Returns (mean probabilities,
    mutual information) or, for regression, (mean, std). Uses a forked torch RNG seeded with `seed`, so it is
    reproducible and leaves the caller's random state untouched."""
    from .ensemble import entropy

    with eval_mode(model), peft_dropout_on(model) as active, torch.random.fork_rng(
            devices=[inputs["input_ids"].device] if inputs["input_ids"].is_cuda else []):
        if not active:
            raise ValueError("MC dropout needs PEFT's lora_dropout > 0 in the model's LoraConfig")
        torch.manual_seed(seed)
        outs = torch.stack([model(**inputs).logits.float() for _ in range(n)])
    if regression:
        values = outs.squeeze(-1)
        return values.mean(0), values.std(0, unbiased=False)
    probs = outs.softmax(-1)
    mean = probs.mean(0)
    return mean, (entropy(mean) - entropy(probs).mean(0)).clamp_min(0)


@torch.no_grad()
def predict_classification(
    model: torch.nn.Module,
    dataset: Any,
    collator: Any,
    *,
    batch_size: int = 64,
    ensemble: int = 0,
    chunk_size: int | None = None,
    seed: int = 0,
    regression: bool = False,
    progress: bool = True,
    mc_dropout: bool = False,
) -> Predictions:
    """Single-pass (eval mode, expected update) and `ensemble`-member predictions over a tokenized dataset
    (`mc_dropout`: the ensemble is `ensemble` MC-dropout passes instead of LoRA Dropout members)."""
    from tqdm.auto import tqdm

    if ensemble and not mc_dropout:
        get_active_controller(model, "an ensemble")  # fail early: not applied, or its adapter is not active
    device = next(model.parameters()).device
    singles, ensembles, spreads, labels = [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    with eval_mode(model):
        for i, batch in enumerate(tqdm(loader, desc="evaluate", disable=not progress, leave=False)):
            if "labels" in batch:
                labels.append(batch["labels"])
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.float()
            singles.append(logits.squeeze(-1) if regression else logits.softmax(-1))
            if ensemble and mc_dropout:
                mean, spread = mc_dropout_predict(model, inputs, ensemble, seed=batch_seed(seed, i),
                                                  regression=regression)
                ensembles.append(mean)
                spreads.append(spread)
            elif ensemble:
                out = ensemble_predict(model, inputs, ensemble, chunk_size=chunk_size, seed=batch_seed(seed, i))
                ensembles.append(out.mean if regression else out.probs)
                spreads.append(out.std if regression else out.mutual_information)

    def cat(xs: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.cat(xs).cpu() if xs else None

    spread = cat(spreads)
    return Predictions(single=cat(singles), ensemble=cat(ensembles), labels=cat(labels),
                       mutual_information=None if regression else spread, ensemble_std=spread if regression else None)
