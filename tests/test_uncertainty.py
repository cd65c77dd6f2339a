"""Acting on uncertainty: selective prediction against hand-computed curves, OOD detection against scikit-learn,
conformal sets' coverage on synthetic data with known probabilities, and temperature scaling."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from loradrop.calibration import TemperatureScaler, negative_log_likelihood
from loradrop.conformal import ConformalClassifier, ConformalRegressor, conformal_quantile, split_conformal
from loradrop.uncertainty import (
    coverage_at_accuracy,
    ood_detection,
    plot_risk_coverage,
    selective_prediction,
    sequence_scores,
    uncertainty_score,
)


# ------------------------------------------------------------------------------------------------ scores
def test_uncertainty_scores_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(uncertainty_score(probs, "max_prob"), torch.tensor([0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(uncertainty_score(probs, "margin"), torch.tensor([0.8, 0.0], dtype=torch.float64))
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    torch.testing.assert_close(uncertainty_score(probs, "entropy"), torch.tensor([h, 0.0], dtype=torch.float64))
    members = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)  # two confident members, disagreeing
    mi = uncertainty_score(members.mean(0), "mutual_information", member_probs=members)
    torch.testing.assert_close(mi, torch.tensor([math.log(2)], dtype=torch.float64))
    with pytest.raises(ValueError, match="needs member_probs"):
        uncertainty_score(probs, "mutual_information")
    with pytest.raises(ValueError, match="score must be one of"):
        uncertainty_score(probs, "variance")


# ------------------------------------------------------------------------------------------------ selective prediction
def test_risk_coverage_curve_by_hand():
    # ranked by uncertainty: right, right, wrong, wrong -> risks 0, 0, 1/3, 1/2 at coverage 1/4 .. 1
    good = selective_prediction([0.1, 0.4, 0.2, 0.3], correct=[1, 0, 1, 0])
    torch.testing.assert_close(good.coverage, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(good.risk, torch.tensor([0, 0, 1 / 3, 1 / 2], dtype=torch.float64))
    torch.testing.assert_close(good.accuracy, torch.tensor([1, 1, 2 / 3, 1 / 2], dtype=torch.float64))
    assert good.aurc == pytest.approx(5 / 24) and good.aurc_optimal == pytest.approx(5 / 24)
    assert good.eaurc == pytest.approx(0)
    # the reverse ranking: wrong ones first -> risks 1, 1, 2/3, 1/2
    bad = selective_prediction([0.4, 0.1, 0.3, 0.2], correct=[1, 0, 1, 0])
    assert bad.aurc == pytest.approx(19 / 24) and bad.eaurc == pytest.approx(14 / 24)
    assert list(bad.thresholds) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_ties_are_kept_or_rejected_together():
    # {0.1: right}, {0.2: right, wrong}, {0.3: wrong}: risks 0, 1/3, 1/2 at coverage 1/4, 3/4, 1
    for correct in ([1, 1, 0, 0], [1, 0, 1, 0]):  # the order inside the tie does not matter
        curve = selective_prediction([0.1, 0.2, 0.2, 0.3], correct=correct)
        torch.testing.assert_close(curve.coverage, torch.tensor([0.25, 0.75, 1.0], dtype=torch.float64))
        torch.testing.assert_close(curve.risk, torch.tensor([0, 1 / 3, 1 / 2], dtype=torch.float64))
        assert curve.aurc == pytest.approx((0 + 2 / 3 + 1 / 2) / 4)


def test_aurc_matches_the_textbook_loop_and_the_analytic_optimum():
    rng = np.random.default_rng(0)
    n = 4000
    u = rng.random(n)
    correct = rng.random(n) > u * 0.6  # more errors where the score is high
    curve = selective_prediction(u, correct=correct)
    loss = (~correct).astype(float)[np.argsort(u)]
    reference = np.mean(np.cumsum(loss) / np.arange(1, n + 1))  # Geifman et al.: mean risk over coverages k/n
    assert curve.aurc == pytest.approx(reference, rel=1e-9)
    r = loss.mean()
    assert curve.aurc_optimal == pytest.approx(r + (1 - r) * math.log(1 - r), abs=2e-3)  # E-AURC's closed form
    assert 0 < curve.eaurc < curve.aurc


def test_regression_loss_and_coverage_at_accuracy():
    curve = selective_prediction(torch.tensor([0.5, 0.1, 0.3]), loss=torch.tensor([4.0, 1.0, 0.0]))
    torch.testing.assert_close(curve.risk, torch.tensor([1.0, 0.5, 5 / 3], dtype=torch.float64))
    u, correct = [0.1, 0.2, 0.2, 0.3], [1, 1, 0, 0]  # selective accuracy 1, 2/3, 1/2
    assert coverage_at_accuracy(u, correct, 1.0) == (0.25, pytest.approx(0.1))
    assert coverage_at_accuracy(u, correct, 0.6) == (0.75, pytest.approx(0.2))
    assert coverage_at_accuracy(u, correct, 0.5) == (1.0, pytest.approx(0.3))
    assert coverage_at_accuracy([0.1], [0], 0.9) == (0.0, None)
    with pytest.raises(ValueError, match="exactly one of"):
        selective_prediction(u)
    with pytest.raises(ValueError, match="has 4 values but the labels/losses 3"):
        selective_prediction(u, correct=[1, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        selective_prediction([0.1, float("nan")], correct=[1, 0])


def test_plot_is_a_png(tmp_path):
    curves = {"max_prob": selective_prediction([0.1, 0.4, 0.2, 0.3], correct=[1, 0, 1, 0]),
              "mi": selective_prediction([0.4, 0.1, 0.3, 0.2], correct=[1, 0, 1, 0])}
    for accuracy in (False, True):
        path = plot_risk_coverage(curves, tmp_path / f"rc{accuracy}.png", accuracy=accuracy, title="t")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ OOD detection
def test_ood_metrics_match_sklearn_and_a_hand_fpr95():
    rng = np.random.default_rng(1)
    ins, outs = rng.normal(0, 1, 300), rng.normal(1.5, 1, 200)
    got = ood_detection(torch.tensor(ins), outs)
    y, s = np.r_[np.zeros(300), np.ones(200)], np.r_[ins, outs]
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert got["aupr_out"] == pytest.approx(average_precision_score(y, s))
    assert got["aupr_in"] == pytest.approx(average_precision_score(1 - y, -s))
    threshold = np.sort(outs)[10]  # the highest threshold that still flags 190 of 200 OOD examples (95%)
    assert got["fpr_at_95_tpr"] == pytest.approx(np.mean(ins >= threshold))
    perfect = ood_detection([0.0, 0.1], [0.9, 1.0])
    assert perfect["auroc"] == 1 and perfect["fpr_at_95_tpr"] == 0 and perfect["n_in"] == 2


# ------------------------------------------------------------------------------------------------ conformal
def test_finite_sample_quantile():
    scores = torch.arange(1.0, 11.0)  # n = 10
    assert conformal_quantile(scores, 0.1) == 10  # ceil(11 * 0.9) = 10th smallest
    assert conformal_quantile(scores, 0.2) == 9  # ceil(8.8) = 9
    assert conformal_quantile(scores, 0.05) == math.inf  # ceil(10.45) = 11 > n: every label
    assert conformal_quantile(torch.arange(1.0, 10.0), 0.1) == 9  # (n+1)(1-alpha) = 9 exactly, no rounding up
    with pytest.raises(ValueError, match="alpha must be in"):
        conformal_quantile(scores, 1.0)


def test_class_scores_by_hand():
    probs = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    lac = ConformalClassifier(method="lac").class_scores(probs)
    aps = ConformalClassifier(method="aps").class_scores(probs)
    raps = ConformalClassifier(method="raps", k_reg=1, lam=0.1).class_scores(probs)
    torch.testing.assert_close(lac, torch.tensor([[0.8, 0.5, 0.7]], dtype=torch.float64))
    torch.testing.assert_close(aps, torch.tensor([[1.0, 0.5, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(raps, torch.tensor([[1.2, 0.5, 0.9]], dtype=torch.float64))
    conformal = ConformalClassifier(method="aps")
    conformal.qhat = 0.85
    assert conformal.predict(probs).tolist() == [[False, True, True]]
    with pytest.raises(RuntimeError, match="call fit"):
        ConformalClassifier().predict(probs)
    with pytest.raises(ValueError, match="method must be one of"):
        ConformalClassifier(method="naive")


def synthetic(rng, n, classes=6):
    """Probabilities that are the true conditional distribution: labels are drawn from them."""
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.5, 3, size=(n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    return torch.tensor(probs), torch.tensor(labels)


@pytest.mark.parametrize("method, options", [("lac", {}), ("aps", {}), ("aps", {"randomize": True}),
                                             ("raps", {"k_reg": 1, "lam": 0.2, "randomize": True})])
def test_coverage_is_at_least_one_minus_alpha(method, options):
    rng = np.random.default_rng(7)
    alpha, trials, coverages, sizes = 0.1, 40, [], []
    for trial in range(trials):
        probs, labels = synthetic(rng, 1500)
        result = split_conformal(probs, labels, alpha=alpha, method=method, calibration_fraction=1 / 3, seed=trial,
                                 **options)
        assert result["n_calibration"] == 500 and result["n_test"] == 1000
        coverages.append(result["coverage"])
        sizes.append(result["mean_set_size"])
    mean = float(np.mean(coverages))
    assert mean >= 1 - alpha - 0.01, (method, mean)
    if method == "lac" or options.get("randomize"):  # (nearly) exact: at most 1 - alpha + 1/(n+1) in expectation
        assert mean <= 1 - alpha + 0.015, (method, mean)
    assert 1 <= np.mean(sizes) < 6


def test_conformal_regression_intervals_cover_and_adapt():
    rng = np.random.default_rng(3)
    coverages = []
    for _ in range(30):
        mean, std = rng.normal(size=1000), rng.uniform(0.1, 2.0, 1000)
        y = mean + std * rng.normal(size=1000)  # the ensemble's std is the true noise scale
        reg = ConformalRegressor(alpha=0.1).fit(mean[:400], std[:400], y[:400])
        result = reg.evaluate(mean[400:], std[400:], y[400:])
        coverages.append(result["coverage"])
    assert 0.89 <= np.mean(coverages) <= 0.915
    lower, upper = reg.predict([0.0, 0.0], [0.1, 1.0])
    assert (upper - lower)[1] > 5 * (upper - lower)[0]  # wider where the members disagree
    assert result["qhat"] == pytest.approx(1.645, abs=0.2)  # the normal 95% quantile


# ------------------------------------------------------------------------------------------------ temperature scaling
def overconfident(seed, n=3000, classes=4, sharpen=3.0):
    gen = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, classes, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=gen).squeeze(1)
    return true_logits * sharpen, labels


def test_temperature_scaling_lowers_nll_and_finds_the_temperature(tmp_path):
    logits, labels = overconfident(0)
    scaler = TemperatureScaler().fit(logits[:2000], labels[:2000])
    assert scaler.temperature == pytest.approx(3.0, rel=0.15)
    before = negative_log_likelihood(logits[2000:].softmax(-1), labels[2000:])
    after = negative_log_likelihood(scaler.transform(logits[2000:]), labels[2000:])
    assert after < before - 0.1
    assert scaler.fit_info["nll_after"] < scaler.fit_info["nll_before"]
    path = scaler.save(tmp_path / "calib" / "temperature.json")
    again = TemperatureScaler.load(path)
    assert again.temperature == scaler.temperature and again.fit_info == scaler.fit_info
    torch.testing.assert_close(again.transform(logits[2000:]), scaler.transform(logits[2000:]))
    (tmp_path / "other.json").write_text('{"type": "isotonic"}')
    with pytest.raises(ValueError, match="not a saved TemperatureScaler"):
        TemperatureScaler.load(tmp_path / "other.json")


def test_temperature_scaling_composes_with_ensemble_probabilities():
    logits, labels = overconfident(1)
    gen = torch.Generator().manual_seed(2)
    members = torch.stack([(logits + 0.3 * torch.randn(logits.shape, generator=gen, dtype=torch.float64)).softmax(-1)
                           for _ in range(4)])
    probs = members.mean(0)  # an over-confident ensemble's averaged probabilities
    scaler = TemperatureScaler().fit(probs[:2000], labels[:2000])  # auto: rows sum to 1 -> log of the average
    assert scaler.temperature > 1.5
    calibrated = scaler.transform(probs[2000:])
    torch.testing.assert_close(calibrated, (probs[2000:].log() / scaler.temperature).softmax(-1))
    assert negative_log_likelihood(calibrated, labels[2000:]) < negative_log_likelihood(probs[2000:], labels[2000:])
    assert TemperatureScaler(2.0, inputs="logits").transform(torch.zeros(1, 3)).tolist() == [[1 / 3] * 3]
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        TemperatureScaler(0.0)


# ------------------------------------------------------------------------------------------------ sequences
def test_sequence_scores_ignore_tokens_after_the_end():
    ent = torch.tensor([[0.1, 0.9, 5.0], [0.2, 0.3, 0.4]])
    mi = torch.tensor([[0.2, 0.4, 9.0], [0.0, 0.3, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    scores = sequence_scores(ent, mi, mask)
    torch.testing.assert_close(scores["mutual_information"], torch.tensor([0.3, 0.1]))
    torch.testing.assert_close(scores["max_entropy"], torch.tensor([0.9, 0.4]))
