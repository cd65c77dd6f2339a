"""The commonsense (LLM) section of ``loradrop report`` (#14): the published layout (rows = methods, columns = WG-S /
ARC-C / ARC-E / WG-M / OBQA / BoolQ, ACC / ECE / NLL), the OOD tables, the published numbers in shape, the
risk-coverage AURC table and plot, the cost summary. Results made by the real sweep (a tiny random Llama with
SmolLM2's tokenizer on real OpenBookQA / ARC-C slices); every number checked against a direct computation from the
result files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

RUNS = {("lora", 0), ("lora", 1), ("lora_peft_dropout", 0)}


@pytest.fixture(scope="module")
def results(data_root: Path, llama_dir: Path, tmp_path_factory) -> Path:
    if not (data_root / "commonsense").is_dir():
        pytest.skip(f"no commonsense data in {data_root}")
    from loradrop.app.sweep import SweepPlan, run_sweep

    work = tmp_path_factory.mktemp("cs-report")
    (work / "plan.yaml").write_text(
        f"name: cs\nresults: res\nbase: {{model: {llama_dir}, data_dir: {data_root}, max_train_samples: 16, "
        "max_eval_samples: 12, holdout_fraction: 0.25, max_steps: 1, batch_size: 8, ensemble: 3, lr: 0.01, "
        "ood_task: [arc_challenge]}\ngrid: {task: [openbookqa], seed: [0]}\nmethods:\n"
        "  lora: {no_lora_dropout: true, seed: [0, 1]}\n"
        "  lora_peft_dropout: {no_lora_dropout: true, peft_dropout: 0.1, test_ensemble: mc_dropout}\n")
    summary = run_sweep(SweepPlan.load(work / "plan.yaml"), progress=False)
    assert summary["ok"] == len(RUNS), summary
    return work / "res"


def _load(folder: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        out[(data["method"], data["axes"]["seed"])] = data
    return out


def _table(md: str, heading: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The Markdown table after `heading`: its header and {first cell: {column: cell without bold}}."""
    blocks = md[md.index(heading + "\n"):].split("\n\n")
    lines = next(b for b in blocks if b.startswith("|")).splitlines()
    split = lambda line: [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    rows = {}
    for line in lines[2:]:
        cells = split(line)
        rows.setdefault(cells[0], dict(zip(header, cells)))
    return header, rows


def _stat(values: list[float], scale: float, digits: int) -> str:
    values = np.asarray(values, dtype=float) * scale
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def _direct(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, top-label ECE (15 equal-width bins, right-closed) and NLL, computed here."""
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    bins = np.clip(np.searchsorted(np.linspace(0, 1, 16)[1:-1], conf, side="left"), 0, 14)
    ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    return {"accuracy": correct.mean(), "ece": ece, "nll": -np.log(probs[np.arange(len(labels)), labels]).mean()}


def _aurc(uncertainty: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean over examples of the error rate of the answered set at their
    own threshold (every example at most as uncertain, ties answered together)."""
    return float(np.mean([1.0 - correct[uncertainty <= u].mean() for u in uncertainty]))


ROWS = {"MLE LoRA": ("lora", "single"), "MC dropout (M=3)": ("lora_peft_dropout", "ensemble")}


@pytest.mark.slow
def test_published_layout_ood_shape_risk_and_cost(results: Path, tmp_path: Path) -> None:
    from loradrop.app.report import write_report

    runs = _load(results)
    assert set(runs) == RUNS
    md = write_report([results], tmp_path / "R.md").read_text(encoding="utf-8")
    assert "## Commonsense multiple choice (published layout)" in md
    assert "- Multiple-choice scoring (causal LM tasks): letter (`choice_scoring`" in md  # how the runs were trained

    # in-distribution tables: the published six columns, OBQA filled, the rest "–"; numbers from the result files
    for heading, metric, scale, digits in (("### ACC (%)", "accuracy", 100, 2), ("### ECE (%, 15 bins)", "ece", 100, 2),
                                           ("### NLL", "nll", 1, 3)):
        header, rows = _table(md, heading)
        assert header == ["method", "WG-S", "ARC-C", "ARC-E", "WG-M", "OBQA", "BoolQ"]
        assert set(rows) == {*ROWS, "Temperature scaling (LoRA)"}  # no deep ensemble (below), no ld_1x / Laplace
        for name, (method, pass_) in ROWS.items():
            seeds = sorted(s for m, s in runs if m == method)
            want = _stat([runs[(method, s)]["metrics"]["eval"][pass_][metric] for s in seeds], scale, digits)
            assert rows[name]["OBQA"] == want, (heading, name)
            assert all(rows[name][c] == "–" for c in header[1:] if c != "OBQA")
    # the ensemble rows' own values come from the predictions too (not only from the metrics section)
    for seed in (0, 1):
        preds = runs[("lora", seed)]["predictions"]["test"]
        direct = _direct(np.array(preds["single_probs"]), np.array(preds["label"]))
        assert direct["accuracy"] == pytest.approx(runs[("lora", seed)]["metrics"]["eval"]["single"]["accuracy"])
        assert direct["ece"] == pytest.approx(runs[("lora", seed)]["metrics"]["eval"]["single"]["ece"], abs=1e-5)
    # the max_eval_samples subset is drawn per seed: no deep ensemble, and the report says why
    assert "openbookqa: deep ensemble of k=2 not formed: the `lora` seeds were tested on different examples" in md

    # OOD: ARC-C filled from the runs' ood_sets, ARC-E / Chem / Phys "–"; AUROC as well
    for heading, metric, scale, digits in (("#### ACC (%) on the OOD sets", "accuracy", 100, 2),
                                           ("#### NLL on the OOD sets", "nll", 1, 3)):
        header, rows = _table(md, heading)
        assert header == ["method", "ARC-C", "ARC-E", "Chem", "Phys"]
        for name, (method, pass_) in ROWS.items():
            seeds = sorted(s for m, s in runs if m == method)
            values = []
            for s in seeds:
                ood = runs[(method, s)]["predictions"]["ood_sets"]["arc_challenge"]
                values.append(_direct(np.array(ood[f"{pass_}_probs"]), np.array(ood["label"]))[metric])
            assert rows[name]["ARC-C"] == _stat(values, scale, digits), (heading, name)
            assert rows[name]["ARC-E"] == rows[name]["Chem"] == rows[name]["Phys"] == "–"
    _, rows = _table(md, "#### Detection AUROC of 1 − max p (%) on the OOD sets")
    from sklearn.metrics import roc_auc_score

    aurocs = []
    for s in (0, 1):
        ind = runs[("lora", s)]["predictions"]["test"]
        ood = runs[("lora", s)]["predictions"]["ood_sets"]["arc_challenge"]
        scores = [1 - max(p) for p in ind["single_probs"] + ood["single_probs"]]
        aurocs.append(roc_auc_score([0] * len(ind["label"]) + [1] * len(ood["label"]), scores))
    assert rows["MLE LoRA"]["ARC-C"] == _stat(aurocs, 100, 2)

    # published numbers next to ours; statements computed from both
    header, rows = _table(md, "### Compared with published numbers, in shape only")
    assert [r["WG-S"] for k, r in rows.items() if k.startswith("published")][:1] == ["17.0"]
    assert "- Published (Llama-3.1-8B): MC dropout has a lower ECE than MLE on 5 of 6 tasks" in md
    assert "- Published (Llama-3.1-8B): BLoB has a lower ECE than MLE on 6 of 6 tasks" in md
    ece = {m: np.mean([runs[(m, s)]["metrics"]["eval"][p]["ece"] for mm, s in runs if mm == m])
           for m, p in (("lora", "single"), ("lora_peft_dropout", "ensemble"))}
    below = int(ece["lora_peft_dropout"] < ece["lora"])
    assert f"- Ours: MC dropout (M=3) has a lower ECE than MLE LoRA on {below} of 1 tasks" in md
    same = int((below == 1) == (16.1 <= 17.0 and 9.8 <= 9.8))  # published OBQA: MC dropout 9.8 <= MLE 9.8
    assert f"- Same direction as published (MC dropout vs MLE, ECE): {same} of 1 tasks (OBQA)." in md
    # our rows are labelled by the model the runs recorded, or by its --model-name
    recorded = next(k for k in rows if k.startswith("ours, ")).removeprefix("ours, ")
    named = write_report([results], tmp_path / "N.md", model_names={recorded: "Tiny-Llama"}).read_text(encoding="utf-8")
    assert {k for k in _table(named, "### Compared with published numbers, in shape only")[1]
            if k.startswith("ours")} == {"ours, Tiny-Llama"}

    # risk-coverage: AURC per seed recomputed here; mutual information only for ensembles; one PNG per task
    blocks = md[md.index("### Selective prediction: risk-coverage"):].split("\n\n")
    lines = next(b for b in blocks if b.startswith("|")).splitlines()[2:]
    cells = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.strip("|").split("|")[2].strip()
             for line in lines}
    for (method, pass_), name, score in ((("lora", "single"), "MLE LoRA", "1 − max p"),
                                         (("lora_peft_dropout", "ensemble"), "MC dropout (M=3)", "mutual information")):
        values = []
        for s in sorted(s for m, s in runs if m == method):
            preds = runs[(method, s)]["predictions"]["test"]
            probs, labels = np.array(preds[f"{pass_}_probs"]), np.array(preds["label"])
            u = 1 - probs.max(1) if score == "1 − max p" else np.array(preds["uncertainty"]["mutual_information"])
            values.append(_aurc(u, (probs.argmax(1) == labels).astype(float)))
        assert cells[(name, score)] == _stat(values, 100, 2), (name, score)
    assert ("MLE LoRA", "mutual information") not in cells and ("MC dropout (M=3)", "entropy") in cells
    assert (tmp_path / "R_plots" / "openbookqa_risk_coverage.png").stat().st_size > 0
    assert "](R_plots/openbookqa_risk_coverage.png)" in md

    # cost per method: every method once, LoRA's ratios 1.00x
    _, rows = _table(md, "### Cost per method (commonsense tasks)")
    assert set(rows) == {"lora", "lora_peft_dropout"}
    assert rows["lora"]["train / LoRA"] == rows["lora"]["memory / LoRA"] == "1.00x"
    train = [runs[("lora", s)]["metrics"]["wall_time"]["train_s"] for s in (0, 1)]
    assert rows["lora"]["train (s)"] == f"{np.mean(train):.1f}"
    ratio = runs[("lora_peft_dropout", 0)]["metrics"]["wall_time"]["train_s"] / np.mean(train)
    assert rows["lora_peft_dropout"]["train / LoRA"] == f"{ratio:.2f}x"

    # a run continued from a checkpoint (`attempts`) timed only its last attempt: it counts for memory, not time
    resumed = tmp_path / "resumed"
    shutil.copytree(results, resumed)
    path = resumed / "openbookqa__lora__seed-1.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "attempts": [{"seconds": 99.0, "outcome": "interrupted"}]}))
    md = write_report([resumed], tmp_path / "R2.md").read_text(encoding="utf-8")
    _, rows = _table(md, "### Cost per method (commonsense tasks)")
    assert rows["lora"]["train (s)"] == f"{train[0]:.1f}"


@pytest.mark.slow
def test_deep_ensemble_row_on_shared_test_examples(results: Path, tmp_path: Path) -> None:
    """Two `lora` members scoring the same examples: the deep ensemble row (ID and OOD) is their averaged
    probabilities. The second member is the seed-0 result with its probabilities sharpened (softmax(2 log p))."""
    from loradrop.app.report import write_report

    folder = tmp_path / "res"
    folder.mkdir()
    for path in results.glob("*.json"):
        if "lora__seed-1" not in path.name:
            shutil.copy(path, folder / path.name)
    data = json.loads((results / "openbookqa__lora__seed-0.json").read_text())
    data["axes"]["seed"] = data["settings"]["seed"] = 7
    data["run_id"] = "openbookqa__lora__seed-7"

    def sharpen(rows: dict) -> None:
        p = np.array(rows["single_probs"]) ** 2
        rows["single_probs"] = (p / p.sum(1, keepdims=True)).round(6).tolist()

    for part in ("test", "validation"):
        sharpen(data["predictions"][part])
    sharpen(data["predictions"]["ood_sets"]["arc_challenge"])
    (folder / "openbookqa__lora__seed-7.json").write_text(json.dumps(data))
    members = [json.loads((folder / f"openbookqa__lora__seed-{s}.json").read_text())["predictions"] for s in (0, 7)]

    md = write_report([folder], tmp_path / "R.md").read_text(encoding="utf-8")
    for split, heading, column in (("test", "### ACC (%)", "OBQA"), ("ood", "#### ACC (%) on the OOD sets", "ARC-C")):
        rows = [m["test"] if split == "test" else m["ood_sets"]["arc_challenge"] for m in members]
        mean = np.mean([np.array(r["single_probs"]) for r in rows], axis=0)
        direct = _direct(mean, np.array(rows[0]["label"]))
        _, table = _table(md, heading)
        assert table["Deep ensemble (k=2 LoRA seeds)"][column] == f"{direct['accuracy'] * 100:.2f}"
        if split == "test":
            _, ece = _table(md, "### ECE (%, 15 bins)")
            assert ece["Deep ensemble (k=2 LoRA seeds)"][column] == f"{direct['ece'] * 100:.2f}"
    assert "deep ensemble of k=2 not formed" not in md


def test_the_deep_ensemble_label_counts_only_the_ensembles_formed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task with one LoRA seed, or seeds tested on different examples, forms no deep ensemble, so its size must not
    appear in the row's label (it read "k=1/3" while two tasks had three seeds and four had one)."""
    from loradrop.app import report_commonsense
    from loradrop.app.report_tables import DeepEnsemble

    formed = {"a": None, "b": DeepEnsemble(3, 10, (0, 1, 2), {}), "c": DeepEnsemble(2, 10, (0, 1), {}),
              "d": DeepEnsemble(4, 0, (0, 1, 2, 3), {}, skipped="not formed: different examples")}
    monkeypatch.setattr(report_commonsense, "deep_ensemble", lambda study, task: formed[task])
    assert report_commonsense.deep_ensemble_sizes(object(), ["a", "b", "c", "d"]) == [2, 3]
    assert report_commonsense.deep_ensemble_sizes(object(), ["a", "d"]) == []
