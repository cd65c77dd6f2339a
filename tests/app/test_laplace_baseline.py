"""The Laplace-LoRA baseline (issue #14, `loradrop.app.laplace_baseline`, ``loradrop eval --laplace``). laplace-torch
is optional: the tests that fit a posterior skip without it; the error message and the request checks always run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import get_peft_model

from helpers import lora_config, tiny_bert_config
from loradrop.app.laplace_baseline import PRIOR_METHODS, check_request, fit_laplace, laplace_predict, require_laplace
from loradrop.calibration import classification_calibration
from loradrop.cli import build_parser, main
from loradrop.errors import UsageError

needs_laplace = pytest.mark.skipif(importlib.util.find_spec("laplace") is None,
                                   reason="laplace-torch is not installed (optional: pip install 'loradrop[laplace]')")
CLASSIFIER = SimpleNamespace(name="rte", kind="classification")


def test_missing_laplace_torch_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "laplace", None)  # import laplace -> ImportError, installed or not
    with pytest.raises(UsageError, match=r"needs laplace-torch, which is not installed: pip install 'loradrop\[lap"):
        require_laplace()


def test_requests_the_baseline_cannot_serve_are_refused(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "laplace", None)
    with pytest.raises(UsageError, match=r"laplace='mcmc': allowed \['auto', 'val_nll', 'marglik'\]"):
        check_request("mcmc", CLASSIFIER, has_loradrop=False)
    with pytest.raises(UsageError, match="letter-scored multiple-choice .commonsense. tasks; squad is span"):
        check_request("auto", SimpleNamespace(name="squad", kind="span"), has_loradrop=False)
    with pytest.raises(UsageError, match="plain LoRA run's adapter"):
        check_request("auto", CLASSIFIER, has_loradrop=True)
    with pytest.raises(UsageError, match="needs laplace-torch"):
        check_request("auto", CLASSIFIER, has_loradrop=False)


def test_cli_choices_are_the_prior_methods() -> None:
    parser = build_parser()
    args = parser.parse_args(["eval", "--adapter", "x", "--laplace"])
    assert args.laplace == "auto"
    action = next(a for sub in parser._subparsers._group_actions for name, p in sub.choices.items() if name == "eval"
                  for a in p._actions if a.dest == "laplace")
    assert tuple(action.choices) == PRIOR_METHODS


def _rows(n: int, generator: torch.Generator, vocab: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(5, vocab, (n, 10), generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)  # random labels: nothing generalises
    return [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([row[k] for row in batch]) for k in batch[0]}


@pytest.fixture(scope="module")
def overfit():
    return make_overfit()


def make_overfit():
    """A tiny BERT whose LoRA factors memorised 24 random-label examples: the MAP is confidently wrong elsewhere.
    Returns (model, train, validation, test, last train loss); benchmarks/laplace_overfit.py measures the same."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = tiny_bert_config(initializer_range=0.5)  # wide enough init for 30 steps to memorise random labels
    model = get_peft_model(BertForSequenceClassification(config),
                           lora_config(target_modules=["query", "value", "dense"], task_type="SEQ_CLS"))
    generator = torch.Generator().manual_seed(1)
    train, validation, test = (_rows(n, generator, tiny_bert_config().vocab_size) for n in (24, 24, 48))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(30):
        loss = model(**_collate(train)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    return model, train, validation, test, float(loss.detach())


@needs_laplace
def test_laplace_predictive_is_less_overconfident_than_the_map(overfit) -> None:
    model, train, validation, test, train_loss = overfit
    assert train_loss < 0.3  # the fixture did overfit
    fit = fit_laplace(model, train, validation, _collate, batch_size=12, n_samples=200)
    assert fit.prior_method == "val_nll"
    assert fit.n_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    out = laplace_predict(fit, test, _collate, batch_size=12, n_samples=200)
    maps, probs, labels = out.maps, out.probs, out.labels
    with torch.no_grad():
        logits = model(**{k: v for k, v in _collate(test).items() if k != "labels"}).logits
    torch.testing.assert_close(maps, logits.softmax(-1))  # the "single" row is the MAP itself
    map_metrics, la_metrics = classification_calibration(maps, labels), classification_calibration(probs, labels)
    assert la_metrics["nll"] < map_metrics["nll"]
    assert probs.max(-1).values.mean() < maps.max(-1).values.mean()


@needs_laplace
@pytest.mark.parametrize("path", ["hooked", "one_at_a_time"])
def test_jacobians_equal_laplace_torchs_whole_batch_jacobians(overfit, monkeypatch, path: str) -> None:
    """Both ways `_moments` takes Jacobians (per-row hooks, one pass per class; laplace-torch one example at a time)
    equal laplace-torch's jacrev over the whole batch, padding included."""
    from loradrop.app import laplace_jacobians
    from loradrop.app.laplace_baseline import _moments

    model, train, _, test, _ = overfit
    fit = fit_laplace(model, train, None, _collate, batch_size=12)
    batch = _collate(test[:6])
    batch["attention_mask"][:3, 7:] = 0  # padding no row of the first three uses: cut off for their Jacobians
    batch["input_ids"][:3, 7:] = 0
    whole_js, whole_f = fit.la.backend.jacobians({k: v for k, v in batch.items()})
    assert laplace_jacobians.hooked_jacobians(fit.la.model, batch) is not None  # the hooks cover this model
    if path == "one_at_a_time":
        monkeypatch.setattr(laplace_jacobians, "hooked_jacobians", lambda net, batch: None)
    js, f_mu, present = _moments(fit.la, batch)
    assert present is None and js.shape == whole_js.shape == (6, 3, fit.n_params)
    # float32 Jacobians of differently shaped matmuls: 3 of 59,904 entries differed by up to 5e-5 on one CPU (AMD
    # EPYC); a wrong mask or row would differ by the entries' own size, far above the tolerance
    assert whole_js.abs().max() > 1e-2
    torch.testing.assert_close(js, whole_js, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(f_mu, whole_f, atol=2e-4, rtol=1e-3)


def test_hooked_cloze_jacobians_equal_autograd_per_choice(llama_dir: Path) -> None:
    """Cloze form: one backward pass over the whole batch (each choice's logit depends on its own row) gives every
    choice's gradient, as autograd gives it one logit at a time (laplace-torch's layout: questions, choices,
    parameters in `named_parameters` order); absent choices have zero Jacobians; a model the hooks cannot cover (a
    trainable bias on a LoRA factor) falls back (None)."""
    from transformers import LlamaForCausalLM

    from loradrop.app.laplace_baseline import _ClozeLogits, lora_parameters_only
    from loradrop.app.laplace_jacobians import hooked_jacobians
    from loradrop.tasks.cloze_scoring import ClozeCollator

    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    model = get_peft_model(base, lora_config(target_modules=["q_proj", "v_proj"])).eval()
    lora_parameters_only(model)
    net = _ClozeLogits(model, num_choices=3, per_token=True)
    g = torch.Generator().manual_seed(1)
    features = [{"choice_ids": [torch.randint(5, 200, (4 + q + c,), generator=g).tolist() for c in range(n)],
                 "cont_lens": [1 + (q + c) % 3 for c in range(n)], "labels": 0, "n_choices": n}
                for q, n in enumerate((3, 2, 3))]  # the second question has only two of the three choices
    batch = ClozeCollator(0, 3, train=False)(features)
    js, f = hooked_jacobians(net, batch)
    params = [p for p in net.parameters() if p.requires_grad]
    logits = net(batch)
    expected = torch.zeros_like(js)
    for q, c in zip(*batch["choice_mask"].nonzero(as_tuple=True)):
        grads = torch.autograd.grad(logits[q, c], params, retain_graph=True)
        expected[q, c] = torch.cat([grad.flatten() for grad in grads])
    assert js.shape == (3, 3, sum(p.numel() for p in params)) and expected.abs().max() > 1e-3
    torch.testing.assert_close(js, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(f, logits.detach())
    assert js[1, 2].abs().max() == 0  # the absent third choice
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_A["default"].bias = torch.nn.Parameter(torch.zeros(layer.lora_A["default"].out_features))
    assert hooked_jacobians(net, batch) is None


@needs_laplace
def test_laplace_torchs_exit_on_a_failed_eigendecomposition_is_an_error(overfit, monkeypatch) -> None:
    """laplace-torch calls exit() when a Kronecker factor's eigh fails even with jitter; in a sweep worker that
    would end the process and hang the pool, so the fit raises an ordinary error instead."""
    model, train, _, _, _ = overfit

    def failing_eigh(*args, **kwargs):
        raise RuntimeError("linalg.eigh: did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    with pytest.raises(RuntimeError, match="laplace-torch gave up: the eigendecomposition"):
        fit_laplace(model, train, None, _collate, batch_size=12)


@needs_laplace
def test_marglik_prior_needs_no_validation(overfit) -> None:
    model, train, _, test, _ = overfit
    fit = fit_laplace(model, train, None, _collate, batch_size=12)
    assert fit.prior_method == "marglik" and fit.prior_precision > 0
    with pytest.raises(UsageError, match="'val_nll' needs a validation split"):
        fit_laplace(model, train, None, _collate, prior="val_nll")


@needs_laplace
@pytest.mark.slow
def test_eval_laplace_end_to_end(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "rte"
    assert main(["train", "--task", "rte", "--model", str(bert_dir), "--max-train-samples", "32",
                 "--max-eval-samples", "16", "--max-steps", "2", "--batch-size", "8", "--max-seq-len", "32",
                 "--no-lora-dropout", "--holdout-fraction", "0.25", "--output", str(run)]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(run), "--laplace", "--output", str(out)]) == 0
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["laplace"]["prior_method"] == "val_nll"  # the run held a validation split out of train
    assert metrics["laplace"]["n_train"] == 24
    assert metrics["eval"]["ensemble"]["n"] == 16 and {"ece", "nll", "brier"} <= set(metrics["eval"]["ensemble"])
    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and sum(rows[0]["ensemble_probs"]) == pytest.approx(1.0)


def test_an_unknown_laplace_prior_is_a_settings_error() -> None:
    from loradrop.app.settings import EvalSettings
    from loradrop.errors import SettingsError

    with pytest.raises(SettingsError, match=r"laplace must be one of \['auto', 'val_nll', 'marglik'\], got 'bogus'"):
        EvalSettings(adapter="runs/x", laplace="bogus")
    assert EvalSettings(adapter="runs/x", laplace="marglik").laplace == "marglik"


# ------------------------------------------------------------------ letter-scored (causal LM) commonsense tasks
def test_predictive_gives_absent_choices_exactly_zero() -> None:
    from loradrop.app.laplace_baseline import _predictive

    generator = torch.Generator().manual_seed(0)
    f_mu = torch.tensor([[1.0, 0.5, -0.2, -1e4], [0.3, -0.1, -1e4, -1e4]])
    f_var = 1e8 * torch.eye(4).expand(2, 4, 4)  # so wide that a -1e4 logit would often win without the mask
    present = torch.tensor([[True, True, True, False], [True, True, False, False]])
    probs, information = _predictive(f_mu, f_var, 500, generator, present)
    assert probs[0, 3] == 0 and (probs[1, 2:] == 0).all() and probs[1, 1] > 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert (information >= 0).all() and information[0] > 0.1  # draws that disagree: positive mutual information


def test_predictive_survives_a_covariance_float32_cholesky_rejects() -> None:
    """A low-rank covariance of large scale (a weak prior) is not positive-definite in float32 even with the jitter;
    the fallback's draws still have that covariance, and a positive-definite batch element draws as before."""
    from loradrop.app.laplace_baseline import _covariance_root, _predictive

    rank_one = torch.tensor([[1e4, 1e4 + 1], [1e4 + 1, 1e4]])  # an eigenvalue of -1: rounding of a rank-one GGN
    assert torch.linalg.cholesky_ex(rank_one + 1e-6 * torch.eye(2)).info > 0
    f_var = torch.stack([rank_one, torch.tensor([[2.0, 0.5], [0.5, 1.0]])])
    root = _covariance_root(f_var)
    assert torch.equal(root[1], torch.linalg.cholesky(f_var[1] + 1e-6 * torch.eye(2)))  # unchanged where it works
    torch.testing.assert_close(root[0] @ root[0].mT, f_var[0], rtol=1e-4, atol=1.0)  # |eigenvalue| 1 clamped to 0
    probs, information = _predictive(torch.zeros(2, 2), f_var, 200, torch.Generator().manual_seed(0))
    assert torch.isfinite(probs).all() and torch.isfinite(information).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_letter_tasks_refuse_what_stays_unsupported(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "laplace", None)
    letters = SimpleNamespace(name="arc_easy", kind="causal_lm", predicts_classes=True, trainable=True)
    with pytest.raises(UsageError, match="needs laplace-torch"):  # a letter task with OOD sets passes the checks
        check_request("auto", letters, has_loradrop=False, ood=True)
    with pytest.raises(UsageError, match="mmlu_college_chemistry is an evaluation set only"):
        check_request("auto", SimpleNamespace(name="mmlu_college_chemistry", kind="causal_lm", predicts_classes=True,
                                              trainable=False), has_loradrop=False)
    with pytest.raises(UsageError, match="does not combine with --conformal-alpha"):
        check_request("auto", letters, has_loradrop=False, conformal=True)
    with pytest.raises(UsageError, match="--ood-task only on letter-scored tasks.*rte is classification"):
        check_request("auto", CLASSIFIER, has_loradrop=False, ood=True)
    with pytest.raises(UsageError, match="alpaca is instruct"):
        check_request("auto", SimpleNamespace(name="alpaca", kind="instruct"), has_loradrop=False)


@needs_laplace
@pytest.mark.slow
def test_eval_laplace_on_letter_scored_choices(data_root: Path, llama_dir: Path, tmp_path: Path) -> None:
    """A tiny random Llama trained on an ARC-Easy slice (five letters; most questions have four choices), scored
    with --laplace and OpenBookQA (four letters) as OOD set: the MAP is the letter scorer's own single pass, absent
    choices get probability 0 and present ones sum to 1, and the predictive differs from the MAP."""
    root = data_root / "commonsense"
    if not root.is_dir():
        pytest.skip(f"no commonsense data in {root}")
    run = tmp_path / "arc"
    assert main(["train", "--task", "arc_easy", "--model", str(llama_dir), "--data-dir", str(data_root),
                 "--max-train-samples", "32", "--max-eval-samples", "12", "--holdout-fraction", "0.25",
                 "--max-steps", "4", "--batch-size", "8", "--lr", "0.01", "--max-seq-len", "96",
                 "--no-lora-dropout", "--output", str(run)]) == 0
    assert main(["eval", "--adapter", str(run), "--output", str(tmp_path / "map")]) == 0
    out = tmp_path / "laplace"
    assert main(["eval", "--adapter", str(run), "--laplace", "--ood-task", "openbookqa", "--data-dir",
                 str(data_root), "--output", str(out)]) == 0
    metrics = json.loads((out / "eval_metrics.json").read_text())
    section = metrics["laplace"]
    trained = json.loads((run / "metrics.json").read_text())["data"]["rows"]  # the run's own train rows
    assert section["prior_method"] == "val_nll" and section["n_train"] == trained["train"] == 32 - trained["validation"]
    assert "letters" in section["scored_by"]
    assert section["n_params"] > 0
    ensemble, single = metrics["eval"]["ensemble"], metrics["eval"]["single"]
    assert ensemble["n"] == 12 and all(np.isfinite(ensemble[k]) for k in ("nll", "ece", "brier"))

    def rows(folder: Path, name: str = "eval_predictions.jsonl") -> list[dict]:
        return [json.loads(line) for line in (folder / name).read_text().splitlines()]

    choices = {}  # the official ARC-Easy dev file (the test split of a holdout run): each question's choice count
    for line in (root / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl").read_text().splitlines():
        row = json.loads(line)
        choices[row["id"]] = len(row["question"]["choices"])
    laplace_rows, map_rows = rows(out), {r["id"]: r for r in rows(tmp_path / "map")}
    assert any(choices[r["id"]] < 5 for r in laplace_rows)
    for r in laplace_rows:
        n = choices[r["id"]]
        for key in ("single_probs", "ensemble_probs"):
            assert len(r[key]) == 5 and all(p == 0 for p in r[key][n:]) and all(p > 0 for p in r[key][:n])
            assert sum(r[key]) == pytest.approx(1.0, abs=1e-5)
        # the Laplace fit's MAP is the letter scorer's own single pass (same model, same letters)
        assert r["single_probs"] == pytest.approx(map_rows[r["id"]]["single_probs"], abs=1e-5)
    assert single["nll"] == pytest.approx(json.loads((tmp_path / "map" / "eval_metrics.json").read_text())
                                          ["eval"]["single"]["nll"], abs=1e-5)
    # the predictive is not the MAP: the sampled logits disagree (a near-uniform tiny model and val_nll's prior at
    # the grid's top keep the difference small, but a zero posterior variance would give exactly 0 for both)
    assert max(abs(a - b) for r in laplace_rows for a, b in zip(r["ensemble_probs"], r["single_probs"])) > 1e-6
    assert all(r["uncertainty"]["mutual_information"] > 0 for r in laplace_rows)
    assert ensemble["nll"] != single["nll"]

    ood = metrics["uncertainty"]["ood"]
    assert ood["task"] == "openbookqa" and ood["metrics"]["ensemble"]["n"] == 12
    assert np.isfinite(ood["metrics"]["ensemble"]["nll"]) and 0.0 <= ood["scores"]["ensemble_max_prob"]["auroc"] <= 1
    ood_rows = rows(out, ood["predictions"])
    assert all(len(r["ensemble_probs"]) == 4 and sum(r["ensemble_probs"]) == pytest.approx(1.0, abs=1e-5)
               for r in ood_rows)
    assert "ensemble_mutual_information" in metrics["uncertainty"]["selective"]["scores"]


@needs_laplace
@pytest.mark.slow
def test_eval_laplace_on_cloze_scored_choices(data_root: Path, llama_dir: Path, tmp_path: Path) -> None:
    """The same on a run trained with --choice-scoring cloze (one LM row per choice): eval re-uses the run's cloze
    scoring, the MAP equals the cloze scorer's single pass, absent choices get probability 0, the predictive is not
    the MAP, and OpenBookQA as OOD set is scored in cloze form with its four choices."""
    root = data_root / "commonsense"
    if not root.is_dir():
        pytest.skip(f"no commonsense data in {root}")
    run = tmp_path / "arc"
    assert main(["train", "--task", "arc_easy", "--model", str(llama_dir), "--data-dir", str(data_root),
                 "--max-train-samples", "24", "--max-eval-samples", "8", "--holdout-fraction", "0.25",
                 "--max-steps", "3", "--batch-size", "6", "--lr", "0.01", "--max-seq-len", "96",
                 "--choice-scoring", "cloze", "--no-lora-dropout", "--output", str(run)]) == 0
    assert main(["eval", "--adapter", str(run), "--output", str(tmp_path / "map")]) == 0
    out = tmp_path / "laplace"
    assert main(["eval", "--adapter", str(run), "--laplace", "--ood-task", "openbookqa", "--data-dir",
                 str(data_root), "--output", str(out)]) == 0
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["laplace"]["scored_by"].startswith("each choice's log-likelihood")
    assert metrics["data"]["choice_scoring"]["scoring"].startswith("cloze")
    map_metrics = json.loads((tmp_path / "map" / "eval_metrics.json").read_text())
    assert metrics["eval"]["single"]["nll"] == pytest.approx(map_metrics["eval"]["single"]["nll"], abs=1e-4)

    def rows(folder: Path, name: str = "eval_predictions.jsonl") -> list[dict]:
        return [json.loads(line) for line in (folder / name).read_text().splitlines()]

    laplace_rows = rows(out)
    assert len(laplace_rows) == 8
    for r in laplace_rows:
        for key in ("single_probs", "ensemble_probs"):
            assert len(r[key]) == 5 and sum(r[key]) == pytest.approx(1.0, abs=1e-5)
            assert sum(p == 0 for p in r[key]) in (0, 1, 2)  # a fifth (or fourth) choice a question lacks
    assert max(abs(a - b) for r in laplace_rows for a, b in zip(r["ensemble_probs"], r["single_probs"])) > 1e-6
    ood = metrics["uncertainty"]["ood"]
    assert ood["task"] == "openbookqa" and ood["metrics"]["ensemble"]["n"] == 8
    assert all(len(r["ensemble_probs"]) == 4 for r in rows(out, ood["predictions"]))
