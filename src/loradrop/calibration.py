"""Calibration metrics on predicted probabilities: top-label ECE (15 equal-width bins), NLL, Brier, and the data of
a reliability diagram. ECE uses torchmetrics' multiclass convention for every number of classes (two included)."""

from __future__ import annotations

from dataclasses import dataclass

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
