"""Split-conformal prediction on precomputed probabilities (an ensemble's averaged probabilities or a single pass):
label sets with the scores LAC, APS and RAPS, and intervals for regression from an ensemble's mean and std.

Calibrate on held-out examples (`fit`), then `predict` sets for new ones: if calibration and test examples are
exchangeable, the set holds the true label with probability at least 1 - alpha (Vovk et al. 2005; APS: Romano et al.
2020; RAPS: Angelopoulos et al. 2021).

Why these few lines and not a library (checked with ``pip download --no-deps``, November 2026):
- TorchCP 1.2.1 accepts logits directly, but requires torchvision, torch_geometric and torchsort: far too heavy
  for a dependency of this library.
- MAPIE 1.6.0 (numpy, scipy, scikit-learn) wraps a scikit-learn estimator; precomputed probabilities would need a
  fake prefit estimator indexed by row, and its conformity scores assume that API throughout.
- crepes 0.9.1 (numpy, pandas, scipy) accepts precomputed nonconformity scores, but only computes the quantile;
  APS/RAPS scores, randomisation and the sets would still be ours.
What remains is the finite-sample quantile and three score functions, written and tested here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

METHODS = ("lac", "aps", "raps")


def conformal_quantile(scores: Any, alpha: float) -> float:
    """The ceil((n+1)(1-alpha))-th smallest of the n calibration scores (inf when that rank exceeds n): the
    threshold that makes split-conformal sets cover with probability >= 1 - alpha."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    n = scores.numel()
    if n == 0:
        raise ValueError("conformal calibration needs at least one example")
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    return math.inf if rank > n else float(torch.sort(scores).values[rank - 1])


def _check_probs(probs: Any, labels: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    probs = torch.as_tensor(probs).detach().cpu().to(torch.float64)
    if probs.dim() != 2:
        raise ValueError(f"probs must be (n, classes), got shape {tuple(probs.shape)}")
    if labels is None:
        return probs, None
    labels = torch.as_tensor(labels).detach().cpu().long()
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must be (n,) = ({probs.shape[0]},), got {tuple(labels.shape)}")
    if probs.shape[0] and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must be in [0, {probs.shape[1]})")
    return probs, labels


@dataclass
class ConformalClassifier:
    """Split-conformal label sets.

    method: "lac" (score 1 - p_y: the smallest sets), "aps" (the probability mass of the classes ranked up to y:
    adaptive sets), "raps" (APS + ``lam * max(0, rank_y - k_reg)``: penalises long tails of unlikely classes).
    randomize: APS/RAPS with the uniform tie-breaking of Romano et al. (coverage close to exactly 1 - alpha,
    smaller sets; `seed` fixes the draws); without it the sets are deterministic and coverage is >= 1 - alpha.
    """

    alpha: float = 0.1
    method: str = "lac"
    k_reg: int = 1
    lam: float = 0.0
    randomize: bool = False
    seed: int = 0
    qhat: float | None = None
    n_calibration: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if self.k_reg < 0 or self.lam < 0:
            raise ValueError(f"k_reg and lam must be >= 0, got {self.k_reg!r} and {self.lam!r}")

    def class_scores(self, probs: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """The (n, C) nonconformity score of every class of every example (class y is in the set iff its score is
        at most `qhat`)."""
        probs, _ = _check_probs(probs)
        if self.method == "lac":
            return 1.0 - probs
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
        sorted_p = probs.gather(-1, order)
        cum = sorted_p.cumsum(-1)
        if self.randomize:
            u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64)
            cum = cum - (1.0 - u) * sorted_p  # mass strictly before y plus u * p_y
        if self.method == "raps":
            ranks = torch.arange(1, probs.shape[1] + 1, dtype=torch.float64)
            cum = cum + self.lam * (ranks - self.k_reg).clamp_min(0.0)
        return torch.empty_like(cum).scatter_(-1, order, cum)

    def _generator(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 2 + offset)

    def fit(self, probs: Any, labels: Any) -> ConformalClassifier:
        """Calibrate `qhat` on held-out (probabilities, labels)."""
        probs, labels = _check_probs(probs, labels)
        scores = self.class_scores(probs, self._generator(0)).gather(1, labels[:, None]).squeeze(1)
        self.qhat = conformal_quantile(scores, self.alpha)
        self.n_calibration = int(labels.numel())
        return self

    def predict(self, probs: Any) -> torch.Tensor:
        """(n, C) bool: the prediction set of every example."""
        if self.qhat is None:
            raise RuntimeError("call fit(probs, labels) on a calibration split before predict")
        return self.class_scores(probs, self._generator(1)) <= self.qhat + 1e-12

    def evaluate(self, probs: Any, labels: Any) -> dict[str, float]:
        """Empirical coverage and mean set size on a test split (also the fraction of empty sets)."""
        probs, labels = _check_probs(probs, labels)
        sets = self.predict(probs)
        sizes = sets.sum(1).to(torch.float64)
        return {"coverage": float(sets.gather(1, labels[:, None]).double().mean()),
                "mean_set_size": float(sizes.mean()), "empty_fraction": float((sizes == 0).double().mean()),
                "alpha": self.alpha, "qhat": self.qhat, "n_calibration": self.n_calibration, "n_test": len(labels)}


def split_indices(n: int, calibration_fraction: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random (calibration, test) split of range(n)."""
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(round(n * calibration_fraction))
    if cut == 0 or cut == n:
        raise ValueError(f"{n} examples cannot be split into calibration and test with fraction {calibration_fraction}")
    return perm[:cut], perm[cut:]


def split_conformal(probs: Any, labels: Any, *, alpha: float = 0.1, method: str = "lac",
                    calibration_fraction: float = 0.5, seed: int = 0, **options: Any) -> dict[str, Any]:
    """Calibrate on a seeded random part of (probs, labels), evaluate on the rest: the metrics of
    `ConformalClassifier.evaluate` plus "method". `options`: k_reg, lam, randomize."""
    probs, labels = _check_probs(probs, labels)
    cal, test = split_indices(len(labels), calibration_fraction, seed)
    conformal = ConformalClassifier(alpha=alpha, method=method, seed=seed, **options).fit(probs[cal], labels[cal])
    return {"method": method, **conformal.evaluate(probs[test], labels[test])}


# ------------------------------------------------------------------------------------------------ regression
@dataclass
class ConformalRegressor:
    """Conformalised intervals from an ensemble's mean and std: the normalised residual score
    |y - mean| / (std + eps) gives intervals mean ± qhat * (std + eps), wider where the members disagree."""

    alpha: float = 0.1
    eps: float = 1e-6
    qhat: float | None = None
    n_calibration: int = 0

    def fit(self, mean: Any, std: Any, targets: Any) -> ConformalRegressor:
        mean, std, y = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (mean, std, targets))
        if not mean.shape == std.shape == y.shape:
            raise ValueError("mean, std and targets must have one value per example each")
        if (std < 0).any():
            raise ValueError("std must be non-negative")
        self.qhat = conformal_quantile((y - mean).abs() / (std + self.eps), self.alpha)
        self.n_calibration = int(y.numel())
        return self

    def predict(self, mean: Any, std: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) per example."""
        if self.qhat is None:
            raise RuntimeError("call fit(mean, std, targets) on a calibration split before predict")
        mean, std = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (mean, std))
        half = self.qhat * (std + self.eps)
        return mean - half, mean + half

    def evaluate(self, mean: Any, std: Any, targets: Any) -> dict[str, float]:
        lower, upper = self.predict(mean, std)
        y = torch.as_tensor(targets, dtype=torch.float64).flatten()
        inside = (y >= lower) & (y <= upper)
        return {"coverage": float(inside.double().mean()), "mean_width": float((upper - lower).mean()),
                "alpha": self.alpha, "qhat": self.qhat, "n_calibration": self.n_calibration, "n_test": int(y.numel())}
