"""Calibration metrics on predicted probabilities: top-label ECE (15 equal-width bins), NLL, Brier, and the data of
a reliability diagram; post-hoc temperature scaling (`TemperatureScaler`); for regression, the Gaussian NLL and
interval coverage of a predictive mean and spread (`regression_calibration`). ECE uses torchmetrics' multiclass
convention for every number of classes (two included)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

DEFAULT_BINS = 15


def _check(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(probs, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (n, classes) and labels (n,), got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("calibration metrics need at least one example, got none")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be in [0, {probs.shape[1]}), got values in [{labels.min()}, {labels.max()}]")
    return probs, labels


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| weighted by bin size."""
    probs, labels = _check(probs, labels)
    return float(multiclass_calibration_error(probs.float(), labels, num_classes=probs.shape[1], n_bins=n_bins,
                                              norm="l1"))


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log p(true class), probabilities clamped at 1e-12."""
    probs, labels = _check(probs, labels)
    return float(-torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-12)).mean())


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multiclass Brier score: mean over examples of the squared distance to the one-hot label."""
    probs, labels = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def classification_calibration(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS) -> dict:
    """{"accuracy", "ece", "nll", "brier"} for one set of predicted probabilities."""
    p, y = _check(probs, labels)
    return {
        "accuracy": float((p.argmax(1) == y).double().mean()),
        "ece": expected_calibration_error(p, y, n_bins),
        "nll": negative_log_likelihood(p, y),
        "brier": brier_score(p, y),
    }


def regression_calibration(mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, *, level: float = 0.9,
                           min_std: float = 1e-6) -> dict:
    """Calibration of a Gaussian predictive N(mean, std²) per example (e.g. an ensemble's mean and spread):
    ``gaussian_nll`` (mean negative log density of the label, torch's ``gaussian_nll_loss`` with the constant),
    ``coverage_<level%>`` (share of labels inside the central `level` interval mean ± z·std) and
    ``interval_width_<level%>`` (its mean width). `std` is floored at `min_std` (a collapsed spread)."""
    mean, std, labels = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (mean, std, labels))
    if not (mean.shape == std.shape == labels.shape) or mean.numel() == 0:
        raise ValueError(f"mean, std and labels must be non-empty and of one length, got {mean.numel()}, "
                         f"{std.numel()} and {labels.numel()}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    var = std.clamp_min(min_std) ** 2
    nll = torch.nn.functional.gaussian_nll_loss(mean, labels, var, full=True, eps=min_std ** 2)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2, dtype=torch.float64))
    half = z * var.sqrt()
    pct = f"{round(100 * level):d}"
    return {"gaussian_nll": float(nll), f"coverage_{pct}": float(((labels - mean).abs() <= half).double().mean()),
            f"interval_width_{pct}": float(2 * half.mean())}


@dataclass
class ReliabilityDiagram:
    """Per-bin mean confidence, accuracy and count of the top-label predictions."""

    edges: list[float]
    confidence: list[float | None]
    accuracy: list[float | None]
    count: list[int]


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS) -> ReliabilityDiagram:
    probs, labels = _check(probs, labels)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # the same right-closed bins as torchmetrics: (lo, hi], the first bin also takes 0
    index = torch.clamp(torch.bucketize(conf, edges[1:-1], right=False), 0, n_bins - 1)
    confidence, accuracy, count = [], [], []
    for b in range(n_bins):
        in_bin = index == b
        n = int(in_bin.sum())
        count.append(n)
        confidence.append(float(conf[in_bin].mean()) if n else None)
        accuracy.append(float(correct[in_bin].mean()) if n else None)
    return ReliabilityDiagram(edges=edges.tolist(), confidence=confidence, accuracy=accuracy, count=count)


# ------------------------------------------------------------------------------------------------ temperature scaling
def _log_inputs(values: torch.Tensor, inputs: str) -> torch.Tensor:
    """Logits as they are; probabilities (an ensemble's averaged ones included) as their logs."""
    values = torch.as_tensor(values).detach().cpu().to(torch.float64)
    if values.dim() != 2:
        raise ValueError(f"logits or probabilities must be (n, classes), got shape {tuple(values.shape)}")
    if inputs == "auto":
        sums = values.sum(-1)
        looks_like_probs = bool((values >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4))
        inputs = "probs" if looks_like_probs else "logits"
    if inputs == "probs":
        return torch.log(values.clamp_min(1e-12))
    if inputs != "logits":
        raise ValueError(f"inputs must be 'auto', 'logits' or 'probs', got {inputs!r}")
    return values


class TemperatureScaler:
    """Post-hoc temperature scaling (Guo et al. 2017): one scalar T > 0 fitted by minimising the NLL of
    softmax(z / T) on held-out labels, with z the logits or, for probabilities, their logs (so it composes with an
    ensemble: z = log of the members' averaged probabilities). Saved as JSON, reloaded with `load`.

    `inputs`: "auto" treats non-negative rows summing to 1 as probabilities, anything else as logits.
    """

    def __init__(self, temperature: float = 1.0, inputs: str = "auto") -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.inputs = inputs
        self.fit_info: dict = {}

    def fit(self, logits_or_probs: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> TemperatureScaler:
        z = _log_inputs(logits_or_probs, self.inputs)
        _, labels = _check(z.softmax(-1), labels)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(z / log_t.exp(), labels)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        temperature = float(log_t.detach().exp())
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError("temperature scaling did not converge (are the labels all of one class?)")
        before = float(torch.nn.functional.cross_entropy(z, labels))
        self.temperature = temperature
        after = float(torch.nn.functional.cross_entropy(z / temperature, labels))
        self.fit_info = {"n": int(labels.numel()), "nll_before": before, "nll_after": after}
        return self

    def transform(self, logits_or_probs: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities softmax(z / T), float64."""
        return (_log_inputs(logits_or_probs, self.inputs) / self.temperature).softmax(-1)

    def to_dict(self) -> dict:
        return {"type": "temperature_scaling", "temperature": self.temperature, "inputs": self.inputs,
                **self.fit_info}

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TemperatureScaler:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("type") != "temperature_scaling":
            raise ValueError(f"{str(path)!r} is not a saved TemperatureScaler")
        scaler = cls(data["temperature"], data.get("inputs", "auto"))
        scaler.fit_info = {k: data[k] for k in ("n", "nll_before", "nll_after") if k in data}
        return scaler
