"""Learning-rate selection for span tasks (SQuAD, issue #11): a validation split held out of train by article, the
final model and every epoch scored on it, and the report choosing the learning rate from those scores.

The data tests use the real SQuAD v1.1 dev file (skipped without it); the run uses a tiny random BERT with the real
MiniLM tokenizer, so its scores are near zero but every number is a real evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loradrop.errors import UsageError
from loradrop.tasks import get_metadata, load_task_data

FRACTION = 0.2


@pytest.fixture(scope="module")
def squad_dir(data_root: Path) -> Path:
    if not (data_root / "squad" / "v1.1" / "dev-v1.1.json").is_file():
        pytest.skip("squad/v1.1/dev-v1.1.json is not in the data folder")
    return data_root


def test_holdout_is_carved_from_train_by_article(squad_dir: Path) -> None:
    plain = load_task_data("squad", squad_dir, seed=3, max_train_samples=3000)
    held = load_task_data("squad", squad_dir, seed=3, max_train_samples=3000, holdout_fraction=FRACTION)
    titles = {split: set(held[split]["title"]) for split in ("train", "validation", "test")}
    contexts = {split: set(held[split]["context"]) for split in ("train", "validation", "test")}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert titles[a].isdisjoint(titles[b]), (a, b)
        assert contexts[a].isdisjoint(contexts[b]), (a, b)
    assert len(titles["validation"]) >= 2
    # the dev file's article split is unchanged: test is the old evaluation split, validation + train the old train
    assert list(held["test"]["id"]) == list(plain["validation"]["id"])
    assert sorted([*held["train"]["id"], *held["validation"]["id"]]) == sorted(plain["train"]["id"])
    assert 0.1 < len(held["validation"]) / len(plain["train"]) < 0.3
    meta = get_metadata(held)
    assert meta["holdout_fraction"] == FRACTION and meta["rows"]["validation"] == len(held["validation"])
    assert "whole titles" in meta["derived_splits"] and "no title in two splits" in meta["derived_splits"]
    assert "split by article" in meta["split_notes"]["test"] and "by title" in meta["split_notes"]["validation"]


def test_span_run_scores_validation_like_a_direct_evaluation(squad_dir: Path, bert_dir: Path, tmp_path: Path) -> None:
    from loradrop.app.eval_run import load_adapter
    from loradrop.app.settings import TrainSettings
    from loradrop.app.train_run import train
    from loradrop.pretrained import load_model, load_tokenizer, prepare_base
    from loradrop.tasks import get_task, prepare_task, squad_metrics

    settings = TrainSettings(task="squad", model=str(bert_dir), data_dir=str(squad_dir), output=str(tmp_path / "run"),
                             max_train_samples=40, max_eval_samples=12, holdout_fraction=0.25, epoch_eval=True,
                             epochs=2, batch_size=8, max_seq_len=96, ensemble=2, lr=2e-2, seed=1)
    metrics = train(settings).metrics
    assert metrics["eval_split"] == "test" and metrics["eval"]["single"]["n"] == 12
    validation = metrics["eval"]["validation"]
    n_val = metrics["data"]["rows"]["validation"]
    assert validation["single"]["n"] == n_val == validation["ensemble"]["n"] and n_val > 0
    assert validation["ensemble"]["ensemble_size"] == 2
    # per epoch: validation and test single-pass scores, and the best epoch chosen on validation F1
    assert [e["epoch"] for e in metrics["epochs"]] == [1.0, 2.0]
    assert all({"validation", "test"} <= e.keys() for e in metrics["epochs"])
    best = metrics["best_epoch"]
    assert best["split"] == "validation" and best["metric"] == "f1"
    assert best["value"] == max(e["validation"]["single"]["f1"] for e in metrics["epochs"])
    # the recorded validation scores are those of the written predictions ...
    rows = [json.loads(line) for line in (tmp_path / "run" / "validation_predictions.jsonl").read_text().splitlines()]
    refs = {r["id"]: r["answers"] for r in rows}
    for which, key in (("single", "single_prediction"), ("ensemble", "ensemble_prediction")):
        recomputed = squad_metrics({r["id"]: r[key] for r in rows}, refs)
        assert validation[which]["f1"] == pytest.approx(recomputed["f1"])
        assert validation[which]["exact_match"] == pytest.approx(recomputed["exact_match"])
    # ... and of a direct evaluation of the saved adapter on the same held-out questions
    spec = get_task("squad")
    tokenizer = load_tokenizer(str(bert_dir))
    data = prepare_task(spec, squad_dir, tokenizer, max_seq_len=96, seed=1, max_train_samples=40,
                        max_eval_samples=12, holdout_fraction=0.25)
    assert [r["id"] for r in rows] == list(data.raw["validation"]["id"])
    torch.manual_seed(0)
    base = prepare_base(load_model(str(bert_dir), "span"), tokenizer)
    model = load_adapter(base, tmp_path / "run" / "adapter", str(bert_dir), True).eval()
    direct = spec.evaluate(model, data, tokenizer, batch_size=8, ensemble=2, chunk_size=None, seed=1,
                           split="validation")
    for which in ("single", "ensemble"):
        for name in ("exact_match", "f1", "span_nll"):
            assert getattr(direct, which)[name] == pytest.approx(validation[which][name], abs=1e-5), (which, name)


def test_span_runs_still_refuse_mc_dropout_and_generation_runs_a_holdout(tmp_path: Path) -> None:
    from loradrop.app.settings import TrainSettings
    from loradrop.app.train_run import train

    settings = TrainSettings(task="squad", output=str(tmp_path / "x"), no_lora_dropout=True,
                             peft_dropout=0.1, test_ensemble="mc_dropout", holdout_fraction=0.1)
    with pytest.raises(UsageError, match=r"^test_ensemble='mc_dropout': supported for classification and regression"
                                         r" tasks only, not squad \(span\)$"):
        train(settings)
    settings = TrainSettings(task="instruct", output=str(tmp_path / "y"), holdout_fraction=0.1, epoch_eval=True)
    with pytest.raises(UsageError, match=r"^holdout_fraction, epoch_eval: supported for classification, regression "
                                         r"and span tasks only, not alpaca \(causal_lm\)$"):
        train(settings)


def _span_result(method: str, lr: float, seed: int, val_f1: float, test_f1: float) -> dict:
    """A sweep result of a span run without per-epoch evaluation: the final model's validation score only."""
    def scores(f1: float) -> dict:
        return {"exact_match": f1 - 0.1, "f1": f1, "n": 50, "span_ece": 0.1 + seed / 100, "span_nll": 2.0,
                "span_brier": 0.5}

    run_id = f"squad__{method}__lr-{lr}_seed-{seed}"
    return {
        "schema": "loradrop.sweep.run/1", "plan": "squad-test", "run_id": run_id, "method": method,
        "axes": {"task": "squad", "lr": lr, "seed": seed}, "status": "ok",
        "settings": {"task": "squad", "lr": lr, "seed": seed, "model": "minilm", "epochs": 3, "holdout_fraction": 0.2,
                     "max_train_samples": 5000, "max_seq_len": 256, "r": 8, "p": 0.5, "samples": 4},
        "versions": {"torch": "2.5.1"}, "hardware": {"device": "cuda", "gpu": "NVIDIA H200", "gpu_count": 1},
        "wall_time_s": 100.0, "peak_memory_mib": {"cuda": 1000.0},
        "metrics": {"task": "squad", "kind": "span", "model": "minilm-l6",
                    "eval": {"single": scores(test_f1), "ensemble": scores(test_f1 + 0.01),
                             "validation": {"single": scores(val_f1), "ensemble": scores(val_f1)}},
                    "config": {"ensemble_kind": "masks" if method == "lora" else "lora_dropout"},
                    "data": {"derived_splits": "validation held out of train by article"}},
        "loss_history": {"train": []}, "predictions": {},
    }


def test_report_selects_the_span_lr_from_validation_scores(tmp_path: Path) -> None:
    from loradrop.app.report import write_report

    # validation F1 peaks at a different lr per method; the test F1 would pick the other lr (it must be ignored)
    val = {("lora", 5e-4): 0.50, ("lora", 1.5e-3): 0.60, ("ld_paper", 5e-4): 0.40, ("ld_paper", 1.5e-3): 0.30,
           ("ld_paper", 4.5e-3): 0.55}
    folder = tmp_path / "results"
    folder.mkdir()
    for (method, lr), v in val.items():
        for seed in (0, 1, 2):
            if seed and lr != max((k[1] for k in val if k[0] == method), key=lambda x: val[(method, x)]):
                continue  # seeds 1-2 at the chosen lr only, like the tune / main plans
            test = 0.9 - v + 0.01 * seed  # anti-correlated with validation
            result = _span_result(method, lr, seed, v + 0.001 * seed, test)
            (folder / f"{result['run_id']}.json").write_text(json.dumps(result), encoding="utf-8")
    md = write_report([folder], tmp_path / "R.md", plots_dir=tmp_path / "figs").read_text(encoding="utf-8")
    selection = md[md.index("## Selection protocol"):md.index("## Results per task")]
    lines = {line.split("|")[2].strip(): line for line in selection.splitlines()
             if line.startswith("| squad")}
    assert "lr 0.0015: 60.00" in lines["lora"] and "| lr 0.0015 |" in lines["lora"]
    assert "lr 0.0045: 55.00" in lines["ld_paper"] and "| lr 0.0045 |" in lines["ld_paper"]
    for line in lines.values():  # candidates compared on seed 0 (the common seed); all 3 seeds reported
        assert [c.strip() for c in line.strip("|").split("|")][4:6] == ["0", "0,1,2"]
    squad = md[md.index("### squad (main metric: f1)"):md.index("## Plots")]
    lora = next(line for line in squad.splitlines() if line.startswith("| LoRA "))
    assert "| 0.0015 |" in lora and "31.00 ± 1.00" in lora  # seeds 0-2 at lr 1.5e-3: test F1 0.30, 0.31, 0.32
    header = next(line for line in squad.splitlines() if line.startswith("| row"))
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(names, [c.strip() for c in lora.strip("|").split("|")]))
    assert cells["test exact_match (final)"] == "21.00 ± 1.00"  # EM = F1 - 0.1 per seed
    assert cells["ECE (%)"] == "11.00 ± 1.00" and cells["NLL"] == "2.0000 ± 0.0000"  # the span_* calibration
