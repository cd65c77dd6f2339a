"""Laplace-LoRA (Yang et al., ICLR 2024) as a post-hoc baseline on a trained plain-LoRA classifier, through the
maintained ``laplace-torch`` package (optional: ``pip install 'loradrop[laplace]'``).

What is fitted: a Kronecker-factored (KFAC, GGN) Laplace approximation over the LoRA factors only (every
``lora_A`` / ``lora_B`` weight; the base model and the classifier head stay at their trained values), with
laplace-torch's ``Laplace(..., subset_of_weights="all", hessian_structure="kron")`` on the train split.
Prior precision: one scalar, either the validation NLL of the predictive over a log grid (``"val_nll"``, used when the
data has a validation split distinct from the one scored) or laplace-torch's post-hoc marginal likelihood
(``"marglik"``). Predictive: the linearised (GLM) predictive, logits ~ N(f_MAP, J Σ Jᵀ), with the softmax averaged
over Monte-Carlo samples of the logits (as Laplace-LoRA's code does).

Only the app layer imports this module; the core never imports laplace-torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import UsageError
from .settings import LAPLACE_PRIORS as PRIOR_METHODS

GRID = tuple(10.0 ** (k / 2) for k in range(-8, 9))  # prior precisions 1e-4 .. 1e4, half a decade apart


def require_laplace() -> Any:
    """laplace-torch's ``Laplace`` factory, or one clear error saying how to install it."""
    try:
        from laplace import Laplace
    except ImportError as err:
        raise UsageError("the Laplace-LoRA baseline needs laplace-torch, which is not installed: "
                         "pip install 'loradrop[laplace]'") from err
    return Laplace


def check_request(prior: Any, spec: Any, *, has_loradrop: bool, acting: bool) -> None:
    """Refuse, before any model is loaded, what the baseline cannot do (one clear line each)."""
    if prior not in PRIOR_METHODS:
        raise UsageError(f"laplace={prior!r}: allowed {list(PRIOR_METHODS)}")
    if spec.kind != "classification":
        raise UsageError(f"--laplace supports sequence-classification tasks; {spec.name} is {spec.kind}")
    if has_loradrop:
        raise UsageError("--laplace is a baseline on a plain LoRA run's adapter (trained with --no-lora-dropout); "
                         "this adapter has LoRA Dropout")
    if acting:
        raise UsageError("--laplace does not combine with --ood-task / --conformal-alpha")
    require_laplace()


class _Logits(torch.nn.Module):
    """A sequence classifier as laplace-torch wants it: a dict batch in, (batch, classes) logits out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


@dataclass
class LaplaceFit:
    """A fitted Laplace-LoRA posterior: the laplace-torch object, the prior precision chosen and how."""

    la: Any
    prior_precision: float
    prior_method: str
    n_params: int
    fit_s: float
    tune_s: float


def lora_parameters_only(model: torch.nn.Module) -> int:
    """Make exactly the LoRA factors trainable (the Laplace posterior's parameters); their number."""
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
        count += param.numel() if param.requires_grad else 0
    if count == 0:
        raise UsageError("the Laplace-LoRA baseline needs a LoRA adapter; the model has no lora_A / lora_B weights")
    return count


def _loader(dataset: Any, collator: Any, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator)


def _moments(la: Any, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Jacobians, MAP logits) of one batch: computed once and reused for every prior precision (laplace-torch's
    gridsearch would recompute the Jacobians at every grid point)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    return la.backend.jacobians(batch)


def _predictive(f_mu: torch.Tensor, f_var: torch.Tensor, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """The GLM predictive's class probabilities: the softmax averaged over `n_samples` draws of the logits from
    N(f_mu, f_var) (f_var: (batch, C, C)). Hand-written (a few lines) so the draws are seeded and reused across the
    grid; laplace-torch's own MC link draws from the global generator."""
    jitter = 1e-6 * torch.eye(f_var.shape[-1], dtype=f_var.dtype, device=f_var.device)
    scale = torch.linalg.cholesky(f_var + jitter)
    eps = torch.randn((n_samples, *f_mu.shape), generator=generator, dtype=f_mu.dtype).to(f_mu.device)
    logits = f_mu + torch.einsum("bij,sbj->sbi", scale, eps)
    return logits.softmax(-1).mean(0)


def fit_laplace(model: torch.nn.Module, train: Any, validation: Any | None, collator: Any, *, batch_size: int = 16,
                prior: str = "auto", n_samples: int = 1000, seed: int = 0) -> LaplaceFit:
    """Fit KFAC Laplace over `model`'s LoRA factors on `train` and tune its prior precision (`prior`: ``"val_nll"``
    on `validation`, ``"marglik"``, or ``"auto"``: val_nll when `validation` is given, else marglik)."""
    import time

    Laplace = require_laplace()
    if prior not in PRIOR_METHODS:
        raise UsageError(f"prior {prior!r}: allowed {list(PRIOR_METHODS)}")
    method = ("val_nll" if validation is not None else "marglik") if prior == "auto" else prior
    if method == "val_nll" and validation is None:
        raise UsageError("prior 'val_nll' needs a validation split distinct from the evaluation split")
    model.eval()
    n_params = lora_parameters_only(model)
    la = Laplace(_Logits(model), "classification", subset_of_weights="all", hessian_structure="kron")
    start = time.perf_counter()
    la.fit(_loader(train, collator, batch_size))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    if method == "marglik":
        la.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar")
        chosen = float(la.prior_precision)
    else:
        device = next(model.parameters()).device
        nll = torch.zeros(len(GRID), dtype=torch.float64)
        for i, batch in enumerate(_loader(validation, collator, batch_size)):
            js, f_mu = _moments(la, batch, device)
            labels = batch["labels"].to(device)
            for g, precision in enumerate(GRID):
                la.prior_precision = precision
                probs = _predictive(f_mu, la.functional_variance(js), n_samples,
                                    torch.Generator().manual_seed(seed + i))
                nll[g] += -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum().item()
        chosen = GRID[int(nll.argmin())]
        la.prior_precision = chosen
    return LaplaceFit(la=la, prior_precision=chosen, prior_method=method, n_params=n_params, fit_s=fit_s,
                      tune_s=time.perf_counter() - start)


def laplace_predict(fit: LaplaceFit, dataset: Any, collator: Any, *, batch_size: int = 16, n_samples: int = 1000,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MAP probabilities, Laplace predictive probabilities, labels) over a tokenized split."""
    la = fit.la
    device = next(la.model.parameters()).device
    maps, probs, labels = [], [], []
    for i, batch in enumerate(_loader(dataset, collator, batch_size)):
        js, f_mu = _moments(la, batch, device)
        maps.append(f_mu.softmax(-1).cpu())
        probs.append(_predictive(f_mu, la.functional_variance(js), n_samples,
                                 torch.Generator().manual_seed(10_007 + seed + i)).cpu())
        labels.append(batch["labels"])
    return torch.cat(maps), torch.cat(probs), torch.cat(labels)


def evaluate_laplace(model: torch.nn.Module, data: Any, *, prior: str = "auto", batch_size: int = 16,
                     n_samples: int = 1000, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Fit on `data.train`, tune on its validation split (when distinct from the evaluation split), score the
    evaluation split: an `EvalResult` (``single``: the MAP, ``ensemble``: the Laplace predictive, both with the
    task's metrics plus ECE / NLL / Brier, and per-example rows) and the ``laplace`` section (prior, sizes, seconds)."""
    import time

    from ..tasks.classification import classification_metrics
    from ..tasks.spec import EvalResult

    spec = data.spec
    if spec.kind != "classification" or data.train is None:
        raise UsageError(f"the Laplace-LoRA baseline supports sequence-classification tasks; {spec.name} is "
                         f"{spec.kind}")
    validation = data.eval_loss if data.eval_split != "validation" else None  # never tune on the scored split
    fit = fit_laplace(model, data.train, validation, data.collator, batch_size=batch_size, prior=prior,
                      n_samples=n_samples, seed=seed)
    start = time.perf_counter()
    maps, probs, labels = laplace_predict(fit, data.extras["encoded"][data.eval_split], data.collator,
                                          batch_size=batch_size, n_samples=n_samples, seed=seed)
    predict_s = time.perf_counter() - start

    rows = [{"index": i, "label": int(labels[i]), "single_pred": int(maps[i].argmax()),
             "single_probs": [float(v) for v in maps[i]], "ensemble_pred": int(probs[i].argmax()),
             "ensemble_probs": [float(v) for v in probs[i]]} for i in range(len(labels))]
    section = {"structure": "kron", "weights": "lora_A and lora_B only", "predictive": "glm, mc softmax",
               "n_samples": n_samples, "prior_method": fit.prior_method, "prior_precision": fit.prior_precision,
               "n_params": fit.n_params, "n_train": len(data.train), "fit_s": fit.fit_s, "tune_s": fit.tune_s,
               "predict_s": predict_s}
    return EvalResult(single=classification_metrics(spec, maps, labels),
                      ensemble={**classification_metrics(spec, probs, labels), "ensemble_size": n_samples},
                      rows=rows), section
