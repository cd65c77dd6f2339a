import numpy as np
import pytest
import torch

from loradrop.calibration import (
    brier_score,
    classification_calibration,
    expected_calibration_error,
    negative_log_likelihood,
    regression_calibration,
    reliability_diagram,
)


def reference_ece(probs, labels, n_bins=15):
    """Textbook top-label ECE with right-closed equal-width bins, written out by hand."""
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, n_bins + 1)[:-1], np.linspace(0, 1, n_bins + 1)[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs((pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean())
    return ece


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_ece_matches_reference_and_other_metrics(classes):
    rng = np.random.default_rng(classes)
    logits = rng.normal(size=(500, classes)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, classes, 500)
    assert expected_calibration_error(torch.tensor(probs), torch.tensor(labels)) == pytest.approx(
        reference_ece(probs, labels), abs=1e-6)
    assert negative_log_likelihood(torch.tensor(probs), torch.tensor(labels)) == pytest.approx(
        -np.log(probs[np.arange(500), labels]).mean())
    onehot = np.eye(classes)[labels]
    expected_brier = ((probs - onehot) ** 2).sum(1).mean()
    assert brier_score(torch.tensor(probs), torch.tensor(labels)) == pytest.approx(expected_brier)
    diagram = reliability_diagram(torch.tensor(probs), torch.tensor(labels))
    assert sum(diagram.count) == 500
    weighted = sum(c / 500 * abs(a - f) for c, a, f in zip(diagram.count, diagram.accuracy, diagram.confidence) if c)
    assert weighted == pytest.approx(reference_ece(probs, labels), abs=1e-6)


def test_perfect_and_bad_input():
    probs = torch.eye(3)
    m = classification_calibration(probs, torch.arange(3))
    assert m["accuracy"] == 1 and m["ece"] == pytest.approx(0) and m["brier"] == pytest.approx(0)
    with pytest.raises(ValueError, match="labels must be in \\[0, 3\\)"):
        classification_calibration(probs, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="at least one example"):
        classification_calibration(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_regression_calibration_against_scipy():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=200), rng.uniform(0.2, 2.0, size=200)
    labels = mean + std * rng.normal(size=200)
    out = regression_calibration(torch.tensor(mean), torch.tensor(std), torch.tensor(labels))
    assert out["gaussian_nll"] == pytest.approx(-norm.logpdf(labels, mean, std).mean(), rel=1e-9)
    lo, hi = norm.interval(0.9, mean, std)
    assert out["coverage_90"] == pytest.approx(((labels >= lo) & (labels <= hi)).mean())
    assert out["interval_width_90"] == pytest.approx((hi - lo).mean())
    assert 0.8 < out["coverage_90"] < 0.97  # calibrated by construction
    over = regression_calibration(torch.tensor(mean), torch.tensor(std) / 10, torch.tensor(labels), level=0.5)
    assert over["coverage_50"] < 0.1 and over["gaussian_nll"] > out["gaussian_nll"]  # overconfident spread
    collapsed = regression_calibration(torch.zeros(2), torch.zeros(2), torch.tensor([0.0, 1.0]))
    assert np.isfinite(collapsed["gaussian_nll"]) and collapsed["coverage_90"] == 0.5
    with pytest.raises(ValueError, match="one length"):
        regression_calibration(torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="level must be in"):
        regression_calibration(torch.zeros(2), torch.ones(2), torch.zeros(2), level=1.0)
