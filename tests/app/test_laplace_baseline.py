"""The Laplace-LoRA baseline (issue #14, `loradrop.app.laplace_baseline`, ``loradrop eval --laplace``). laplace-torch
is optional: the tests that fit a posterior skip without it; the error message and the request checks always run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

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
        check_request("mcmc", CLASSIFIER, has_loradrop=False, acting=False)
    with pytest.raises(UsageError, match="sequence-classification tasks; squad is span"):
        check_request("auto", SimpleNamespace(name="squad", kind="span"), has_loradrop=False, acting=False)
    with pytest.raises(UsageError, match="plain LoRA run's adapter"):
        check_request("auto", CLASSIFIER, has_loradrop=True, acting=False)
    with pytest.raises(UsageError, match="needs laplace-torch"):
        check_request("auto", CLASSIFIER, has_loradrop=False, acting=False)


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
    """A tiny BERT whose LoRA factors memorised 24 random-label examples: the MAP is confidently wrong elsewhere."""
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
    maps, probs, labels = laplace_predict(fit, test, _collate, batch_size=12, n_samples=200)
    with torch.no_grad():
        logits = model(**{k: v for k, v in _collate(test).items() if k != "labels"}).logits
    torch.testing.assert_close(maps, logits.softmax(-1))  # the "single" row is the MAP itself
    map_metrics, la_metrics = classification_calibration(maps, labels), classification_calibration(probs, labels)
    assert la_metrics["nll"] < map_metrics["nll"]
    assert probs.max(-1).values.mean() < maps.max(-1).values.mean()


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
