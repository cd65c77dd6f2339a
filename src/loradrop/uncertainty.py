"""Acting on uncertainty: selective prediction (risk-coverage curves, AURC, E-AURC, coverage at a target accuracy),
out-of-distribution detection (AUROC, AUPR, FPR at 95% TPR) and sequence-level scores of generated text.

Every function takes an *uncertainty* per example: a higher value means less sure. `uncertainty_score` turns
probabilities into one (``1 - max p``, ``1 - margin``, entropy, mutual information of an ensemble); for regression
pass the ensemble's std. Conformal prediction sets are in `loradrop.conformal`, temperature scaling in
`loradrop.calibration`, the export of members for multi-LoRA servers in `loradrop.serving`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SCORES = ("max_prob", "margin", "entropy", "mutual_information")


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


def _vector(values: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().cpu().to(torch.float64)
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-d sequence, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return tensor


def uncertainty_score(probs: torch.Tensor, score: str = "max_prob", *,
                      member_probs: torch.Tensor | None = None) -> torch.Tensor:
    """An uncertainty per example (higher = less sure) from (B, C) probabilities.

    "max_prob": 1 - max p; "margin": 1 - (p_top1 - p_top2); "entropy": entropy of `probs` (nats);
    "mutual_information": entropy of the mean minus the mean member entropy, from `member_probs` (n, B, C).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    probs = torch.as_tensor(probs).to(torch.float64)
    if score == "max_prob":
        return 1.0 - probs.max(-1).values
    if score == "margin":
        top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        return 1.0 - (top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0.0))
    if score == "entropy":
        return _entropy(probs)
    if member_probs is None:
        raise ValueError("score 'mutual_information' needs member_probs (n, B, C) of an ensemble")
    members = torch.as_tensor(member_probs).to(torch.float64)
    return (_entropy(members.mean(0)) - _entropy(members).mean(0)).clamp_min(0.0)


# ------------------------------------------------------------------------------------------------ selective prediction
@dataclass
class SelectiveCurve:
    """A risk-coverage curve: keep the examples whose uncertainty is at most each threshold.

    `coverage[i]` is the fraction kept at `thresholds[i]` and `risk[i]` the mean loss of the kept ones (for 0/1
    loss, 1 - selective accuracy). Tied uncertainties are kept or rejected together, so the curve has one point per
    distinct value and does not depend on the order of ties. `aurc` is the area under the curve (the mean over
    examples of the risk at their own threshold; Geifman et al. 2018 when there are no ties), `aurc_optimal` the
    area of the finite-sample oracle that rejects the largest losses first, `eaurc` their difference.
    """

    thresholds: torch.Tensor
    coverage: torch.Tensor
    risk: torch.Tensor
    aurc: float
    aurc_optimal: float
    eaurc: float

    @property
    def accuracy(self) -> torch.Tensor:
        """Selective accuracy (for 0/1 loss)."""
        return 1.0 - self.risk

    def to_dict(self) -> dict[str, Any]:
        return {"aurc": self.aurc, "eaurc": self.eaurc, "aurc_optimal": self.aurc_optimal,
                "coverage": self.coverage.tolist(), "risk": self.risk.tolist(), "thresholds": self.thresholds.tolist()}


def _curve(uncertainty: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    order = torch.argsort(uncertainty, stable=True)
    u, cum = uncertainty[order], torch.cumsum(loss[order], 0)
    n = u.numel()
    last = torch.ones(n, dtype=torch.bool)
    last[:-1] = u[1:] != u[:-1]  # the end of each group of tied values
    ends = torch.nonzero(last).squeeze(1)
    kept = (ends + 1).to(torch.float64)
    risk = cum[ends] / kept
    sizes = torch.diff(ends, prepend=torch.tensor([-1])).to(torch.float64)
    return u[ends], kept / n, risk, float((sizes * risk).sum() / n)


def selective_prediction(uncertainty: Any, *, correct: Any = None, loss: Any = None) -> SelectiveCurve:
    """The risk-coverage curve, AURC and E-AURC of an uncertainty score.

    Pass `correct` (bool per example; risk = error rate) or any per-example `loss` (e.g. squared error of a
    regression ensemble's mean, with its std as the uncertainty).
    """
    if (correct is None) == (loss is None):
        raise ValueError("pass exactly one of correct= (bool per example) or loss= (a loss per example)")
    u = _vector(uncertainty, "uncertainty")
    values = _vector(torch.as_tensor(correct).to(torch.float64), "correct") if loss is None else _vector(loss, "loss")
    if values.numel() != u.numel():
        raise ValueError(f"uncertainty has {u.numel()} values but the labels/losses {values.numel()}")
    values = 1.0 - values if loss is None else values
    thresholds, coverage, risk, aurc = _curve(u, values)
    # the oracle ranks by the loss itself, with ties in the loss broken arbitrarily (they cost nothing)
    n = values.numel()
    sorted_loss = torch.sort(values).values
    optimal = float((torch.cumsum(sorted_loss, 0) / torch.arange(1, n + 1, dtype=torch.float64)).mean())
    return SelectiveCurve(thresholds=thresholds, coverage=coverage, risk=risk, aurc=aurc, aurc_optimal=optimal,
                          eaurc=aurc - optimal)


def coverage_at_accuracy(uncertainty: Any, correct: Any, target: float) -> tuple[float, float | None]:
    """(largest coverage whose selective accuracy is >= `target`, the uncertainty threshold that gives it);
    (0.0, None) when no threshold reaches the target."""
    if not 0 <= target <= 1:
        raise ValueError(f"target accuracy must be in [0, 1], got {target!r}")
    curve = selective_prediction(uncertainty, correct=correct)
    ok = torch.nonzero(curve.accuracy >= target - 1e-12).squeeze(1)
    if ok.numel() == 0:
        return 0.0, None
    best = int(ok[-1])
    return float(curve.coverage[best]), float(curve.thresholds[best])


def plot_risk_coverage(curves: dict[str, SelectiveCurve], path: str | os.PathLike[str], *, accuracy: bool = False,
                       title: str | None = None) -> Path:
    """A PNG of risk-coverage (or, ``accuracy=True``, accuracy-coverage) curves, one line per named score, with
    AURC in the legend. Uses matplotlib's Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    try:
        for name, curve in curves.items():
            ys = curve.accuracy if accuracy else curve.risk
            ax.step(curve.coverage.numpy(), ys.numpy(), where="post", label=f"{name} (AURC {curve.aurc:.4f})")
        ax.set_xlabel("coverage")
        ax.set_ylabel("selective accuracy" if accuracy else "selective risk")
        ax.set_xlim(0, 1)
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ OOD detection
def ood_detection(in_scores: Any, out_scores: Any, *, tpr: float = 0.95) -> dict[str, float]:
    """How well an uncertainty score separates an out-of-distribution set (positives: higher uncertainty expected)
    from an in-distribution set, with scikit-learn's metrics.

    Returns "auroc", "aupr_out" (average precision with OOD as the positive class), "aupr_in" (in-distribution as
    positive, scored by the negated uncertainty), "fpr_at_95_tpr" (the fraction of in-distribution examples flagged
    at the lowest threshold that flags `tpr` of the OOD examples; the key names 95 whatever `tpr` is) and the counts.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    ins, outs = _vector(in_scores, "in_scores").numpy(), _vector(out_scores, "out_scores").numpy()
    import numpy as np

    y = np.concatenate([np.zeros(len(ins)), np.ones(len(outs))])
    s = np.concatenate([ins, outs])
    fpr, tprs, _ = roc_curve(y, s)
    return {"auroc": float(roc_auc_score(y, s)), "aupr_out": float(average_precision_score(y, s)),
            "aupr_in": float(average_precision_score(1 - y, -s)),
            "fpr_at_95_tpr": float(fpr[np.searchsorted(tprs, tpr - 1e-12, side="left")]),
            "n_in": len(ins), "n_out": len(outs)}


# ------------------------------------------------------------------------------------------------ generation
SEQUENCE_SCORES = ("mutual_information", "max_entropy")


def sequence_scores(entropy: torch.Tensor, mutual_information: torch.Tensor,
                    token_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sequence-level uncertainty of generated text from its per-token (B, T) values, over the tokens in
    `token_mask` (the generated tokens up to and including the end-of-sequence token):
    "mutual_information": mean token mutual information; "max_entropy": the largest token entropy."""
    mask = torch.ones_like(entropy, dtype=torch.bool) if token_mask is None else token_mask.bool()
    count = mask.sum(-1).clamp_min(1)
    mean_mi = (mutual_information * mask).sum(-1) / count
    max_ent = entropy.masked_fill(~mask, float("-inf")).max(-1).values.clamp_min(0.0)
    return {"mutual_information": mean_mi, "max_entropy": max_ent}


@dataclass
class GenerationOutput:
    """What `loradrop.ensemble_generate` returns: tokens chosen from the members' averaged next-token
    distribution, with per-token uncertainty and a sequence-level score over the `token_mask` tokens
    (`sequence_scores`): `sequence_score` is the `abstain_score` of `ensemble_generate`; `flagged` marks sequences
    whose score passes `abstain_threshold`."""

    sequences: torch.Tensor  # (B, prompt + new)
    new_tokens: torch.Tensor  # (B, new)
    token_probs: torch.Tensor  # (B, new): averaged probability of each chosen token
    entropy: torch.Tensor  # (B, new)
    mutual_information: torch.Tensor  # (B, new)
    n: int
    token_mask: torch.Tensor | None = None  # (B, new) bool: generated before the row finished (its eos included)
    sequence_mutual_information: torch.Tensor | None = None  # (B,): mean token mutual information
    sequence_max_entropy: torch.Tensor | None = None  # (B,): largest token entropy
    sequence_score: torch.Tensor | None = None  # (B,): the abstain_score's value
    flagged: torch.Tensor | None = None  # (B,) bool: sequence_score > abstain_threshold (None without a threshold)
