import numpy as np
import pytest
import torch

from loradrop.calibration import (
    brier_score,
    classification_calibration,
    expected_calibration_error,
    negative_log_likelihood,
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
