"""Prediction loops over a tokenized dataset: the single pass (eval mode, the expected update) and the test-time
ensemble, batch by batch, for sequence classification and regression heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from .ensemble import batch_seed, ensemble_predict, eval_mode
from .model import get_controller


@dataclass
class Predictions:
    """Probabilities (classification) or values (regression) of the single pass and of the ensemble."""

    single: torch.Tensor
    ensemble: torch.Tensor | None
    labels: torch.Tensor | None
    mutual_information: torch.Tensor | None = None  # classification ensembles: epistemic uncertainty per example
    ensemble_std: torch.Tensor | None = None  # regression ensembles: the members' spread per example


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
) -> Predictions:
    """Single-pass (eval mode, expected update) and `ensemble`-member predictions over a tokenized dataset."""
    from tqdm.auto import tqdm

    if ensemble:
        get_controller(model)  # fail early with the apply_lora_dropout hint
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
            if ensemble:
                out = ensemble_predict(model, inputs, ensemble, chunk_size=chunk_size, seed=batch_seed(seed, i))
                ensembles.append(out.mean if regression else out.probs)
                spreads.append(out.std if regression else out.mutual_information)

    def cat(xs: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.cat(xs).cpu() if xs else None

    spread = cat(spreads)
    return Predictions(single=cat(singles), ensemble=cat(ensembles), labels=cat(labels),
                       mutual_information=None if regression else spread, ensemble_std=spread if regression else None)
