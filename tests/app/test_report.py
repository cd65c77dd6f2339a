"""``loradrop report`` on synthetic sweep results built here (no model): sections, the common-seed selection rule,
mean ± std, temperature scaling, the deep ensemble, claim verdicts, missing runs, plots, failed runs, determinism,
and the acting-on-uncertainty tables (sections computed by `loradrop.app.acting` on synthetic predictions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from loradrop.app.report import write_report
from loradrop.app.report_claims import match_verdict, verdict
from loradrop.app.report_tables import apply_temperature, fit_temperature

SCHEMA = "loradrop.sweep.run/1"
SEEDS = (0, 1, 2)
LRS = (1e-4, 1e-3)
NOISE = {0: -0.01, 1: 0.0, 2: 0.01}  # per-seed offset: std over the 3 seeds is exactly 0.01
N_TEST, N_VAL = 80, 60
# (task, method) -> (final test main metric of the single pass, of the ensemble or None) at lr 1e-3 (lr 1e-4: -0.02)
MAIN = {
    ("rte", "lora"): (0.70, 0.68), ("rte", "lora_peft_dropout"): (0.70, 0.705), ("rte", "ld_paper"): (0.74, 0.75),
    ("rte", "ld_1x"): (0.73, 0.74), ("rte", "adalora"): (0.69, None), ("rte", "adalora_ld"): (0.72, 0.73),
    ("rte", "mystery"): (0.65, None),
    ("mrpc", "lora"): (0.80, 0.79), ("mrpc", "lora_peft_dropout"): (0.80, 0.80), ("mrpc", "ld_paper"): (0.76, 0.75),
    ("mrpc", "ld_1x"): (0.77, 0.76), ("mrpc", "adalora"): (0.78, None), ("mrpc", "adalora_ld"): (0.79, 0.80),
}
KINDS = {"lora": "masks", "lora_peft_dropout": "mc_dropout", "adalora": "none", "mystery": "none"}
SENS_P = {0.1: 0.0, 0.5: 0.03, 0.9: -0.02}  # inverted U in p
SENS_N = {1: 0.0, 4: 0.02}  # rises with N


def _overconfident(rng: np.random.Generator, latent: np.ndarray, scale: float = 3.0) -> list[list[float]]:
    """Probabilities sigmoid(scale * (latent + noise)): `scale` times too confident for labels ~ sigmoid(latent)."""
    p1 = 1 / (1 + np.exp(-scale * (latent + rng.normal(0, 0.3, latent.shape))))
    return np.round(np.stack([1 - p1, p1], 1), 6).tolist()


def _split(task: str, n: int, offset: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(len(task) * 1000 + offset)  # the same split for every run of a task
    latent = rng.normal(0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-latent))).astype(int).tolist()
    return latent, labels


def _predictions(task: str, seed: int, regression: bool, ensemble: bool) -> dict:
    rng = np.random.default_rng(seed * 7919 + len(task))
    out = {}
    for split, n, offset in (("test", N_TEST, 0), ("validation", N_VAL, 1)):
        latent, labels = _split(task, n, offset)
        if regression:
            rows = {"id": list(range(n)), "label": latent.round(6).tolist(),
                    "single": (latent + rng.normal(0, 0.5, n)).round(6).tolist()}
        else:
            rows = {"id": list(range(100, 100 + n)), "label": labels, "single_probs": _overconfident(rng, latent)}
            if ensemble:
                rows["ensemble_probs"] = _overconfident(rng, latent, 2.0)
        out[split] = out[f"best_epoch_{split}"] = rows
    return out


def make_result(task: str, method: str, lr: float, seed: int, main: tuple[float, float | None], *,
                local: dict | None = None, validation: float | None = None, metric: str = "accuracy") -> dict:
    """One synthetic sweep result (schema loradrop.sweep.run/1)."""
    single, ens = main
    offset = NOISE[seed] - (0.02 if lr == 1e-4 else 0.0)
    regression = metric == "pearson"
    ld = method.startswith("ld") or method == "adalora_ld"

    def scores(value: float, ece: float) -> dict:
        out = {metric: value + offset, "n": N_TEST}
        if not regression:
            out.update(ece=ece + offset / 2, nll=0.6 + offset, brier=0.4 + offset)
        return out

    ensemble = scores(ens, 0.05) if ens is not None else None
    epochs = [{"epoch": float(e), "step": 10 * e, "train_loss": (0.6 if ld else 0.5) - 0.1 * e + offset,
               "validation": {"single": {metric: 0.7, "nll": (0.5 if ld else 0.45) + (0.0 if ld else 0.1 * e)},
                              "ensemble": None},
               "test": {"single": {metric: 0.7, "ece": 0.2 - 0.02 * e * (2 if ld else 1)}, "ensemble": None}}
              for e in (1, 2, 3)]
    val = validation if validation is not None else 0.70 + (0.05 if lr == 1e-3 else 0.0) + 0.01 * seed
    best = {"epoch": 2.0, "metric": metric, "value": val, "validation": {"single": {metric: val}},
            "test": {"single": {metric: single + offset - 0.005},
                     "ensemble": None if ens is None else {metric: ens + offset - 0.005}}}
    axes = {"task": task, "lr": lr, "seed": seed, **(local or {})}
    run_id = f"{task}__{method}__" + "_".join(f"{k}-{v}" for k, v in sorted(axes.items()) if k != "task")
    settings = {"task": task, "lr": lr, "seed": seed, "model": "minilm", "epochs": 3, "max_train_samples": 2000,
                "holdout_fraction": 0.1, "max_seq_len": 128, "r": 8, "p": 0.5, "samples": 4, **(local or {})}
    return {
        "schema": SCHEMA, "plan": "glue-test", "run_id": run_id, "method": method, "axes": axes,
        "settings": settings, "status": "ok", "versions": {"torch": "2.5.1", "peft": "0.17.0"},
        "hardware": {"device": "cuda", "gpu": "NVIDIA H200", "gpu_count": 1, "gpu_memory_gib": 139.8, "cpu_count": 16},
        "wall_time_s": 120.0, "peak_memory_mib": {"cuda": 2000.0 if ld else 1500.0, "rss": 3000.0},
        "metrics": {"task": task, "kind": "regression" if regression else "classification", "model": "minilm-l6",
                    "eval": {"single": scores(single, 0.12), "ensemble": ensemble,
                             "validation": {"single": {metric: val, "nll": epochs[-1]["validation"]["single"]["nll"]},
                                            "ensemble": None}},
                    "epochs": epochs, "best_epoch": best, "wall_time": {"train_s": 200.0 if ld else 100.0,
                                                                        "eval_s": 10.0},
                    "config": {"ensemble_kind": KINDS.get(method, "lora_dropout" if ens is not None else "none")},
                    "data": {"derived_splits": "validation held out of train"}},
        "loss_history": {"train": []},
        "predictions": _predictions(task, seed, regression, ens is not None),
    }


def _write(folder: Path, result: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{result['run_id']}.json").write_text(json.dumps(result), encoding="utf-8")


def build_study(folder: Path) -> None:
    """2 tasks x the study's methods x 2 lrs x 3 seeds (+ ld_sens / ld_strategy on MRPC, an unknown method on RTE);
    adalora on RTE at lr 1e-3 has seed 0 only (seeds 1, 2 failed), so the common-seed rule picks it."""
    for (task, method), main in MAIN.items():
        locals_ = [{"p": 0.3}, {"p": 0.5}] if method == "ld_1x" else [None]
        for lr in LRS:
            for seed in SEEDS:
                for local in locals_:
                    validation = None
                    if method == "ld_1x":  # joint choice: p=0.3 at lr 1e-4 has the best validation
                        validation = 0.9 if (local["p"], lr) == (0.3, 1e-4) else 0.6
                    if (task, method) == ("rte", "adalora"):
                        if lr == 1e-3 and seed > 0:
                            (folder / f"rte__adalora__lr-0.001_seed-{seed}.failed.json").write_text(json.dumps(
                                {"schema": SCHEMA, "run_id": f"rte__adalora__lr-0.001_seed-{seed}", "status": "failed",
                                 "error": "RuntimeError: CUDA out of memory"}), encoding="utf-8")
                            continue
                        validation = {1e-4: (0.60, 0.90, 0.90), 1e-3: (0.70,)}[lr][seed]
                    _write(folder, make_result(task, method, lr, seed, main, local=local, validation=validation))
    for p, dp in SENS_P.items():
        for n, dn in SENS_N.items():
            for seed in SEEDS:
                for lr in LRS:
                    _write(folder, make_result("mrpc", "ld_sens", lr, seed, (0.76 + dp + dn, 0.78 + dp + dn),
                                               local={"p": p, "samples": n}))
    for strategy in ("ab", "a"):
        for seed in SEEDS:
            _write(folder, make_result("mrpc", "ld_strategy", 1e-3, seed, (0.75, 0.77 if strategy == "ab" else 0.74),
                                       local={"strategy": strategy}))
    (folder / "notes.json").write_text(json.dumps({"not": "a sweep result"}), encoding="utf-8")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("study")
    build_study(root / "results")
    output = write_report([root / "results"], root / "docs" / "REPORT.md")
    return root, output, output.read_text(encoding="utf-8")


def section(md: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = md.index(heading + "\n") + len(heading)
    rest = md[start:]
    ends = [rest.find("\n" + "#" * k + " ") for k in range(1, len(level) + 1)]
    ends = [e for e in ends if e >= 0]
    return rest[: min(ends)] if ends else rest


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_of(text: str, first_cell: str) -> tuple[list[str], list[str]]:
    """(header, cells) of the Markdown table row whose first cell is `first_cell`."""
    head = None
    for line in text.splitlines():
        if not line.startswith("|"):
            head = None
        elif head is None:
            head = _cells(line)
        elif _cells(line)[0] == first_cell:
            return head, _cells(line)
    raise AssertionError(f"no row {first_cell!r} in\n{text}")


def row(text: str, first_cell: str) -> list[str]:
    return table_of(text, first_cell)[1]


def header(text: str) -> list[str]:
    return _cells(next(line for line in text.splitlines() if line.startswith("|")))


def cell(text: str, first_cell: str, column: str) -> str:
    head, cells = table_of(text, first_cell)
    return cells[head.index(column)]


def test_report_has_every_section(study) -> None:
    _, output, md = study
    for heading in ("# LoRA Dropout study report", "## What was run", "## Runs", "## Selection protocol",
                    "## Results per task", "### rte (main metric: accuracy)", "### mrpc (main metric: accuracy)",
                    "## Sensitivity and strategies", "## Plots", "## Cost", "## Claims", "## Limitations"):
        assert heading in md, heading
    assert f"Regenerate: `loradrop report {output.parent.parent / 'results'} -o {output}`" in md
    rte = section(md, "### rte (main metric: accuracy)")
    for name in ("LoRA", "LoRA + LoRA Dropout masks at test only", "LoRA + PEFT dropout 0.1", "MC dropout",
                 "LoRA Dropout (train only)", "LoRA Dropout (train + test)", "AdaLoRA", "mystery (single pass)"):
        row(rte, name)
    assert "common seeds" in md and "ddof=1" in md
    assert "max_train_samples 2000" in section(md, "## Limitations") and "3 seed(s)" in md


def test_failed_runs_are_counted_and_ignored(study) -> None:
    _, _, md = study
    runs = section(md, "## Runs")
    assert "2 failed" in md and "rte__adalora__lr-0.001_seed-1" in runs and "CUDA out of memory" in runs
    assert "1 JSON file(s) that are not sweep results" in runs
    assert row(runs, str(study[0] / "results"))[1:] == [str(sum(1 for p in (study[0] / "results").glob("*.json")
                                                               if not p.name.endswith(".failed.json")) - 1), "2"]


def test_lr_is_chosen_on_the_common_seeds(study) -> None:
    _, _, md = study
    rte = section(md, "### rte (main metric: accuracy)")
    # adalora: lr 1e-4 wins on all its seeds (0.60, 0.90, 0.90 -> 0.80 > 0.70) but loses on seed 0, the only seed
    # lr 1e-3 has: the common-seed rule picks 1e-3, and reports its one seed
    assert cell(rte, "AdaLoRA", "lr") == "0.001" and cell(rte, "AdaLoRA", "n seeds") == "1"
    selection = section(md, "## Selection protocol")
    adalora = next(line for line in selection.splitlines() if line.startswith("| rte") and "| adalora " in line)
    assert "lr 0.0001: 60.00; lr 0.001: 70.00" in adalora
    # ld_1x: its local axis p is chosen jointly with the lr
    assert cell(rte, "LoRA Dropout 1x cost, samples=1 (train only)", "lr") == "0.0001"
    assert cell(rte, "LoRA Dropout 1x cost, samples=1 (train only)", "setting") == "p=0.3"
    assert cell(rte, "LoRA", "lr") == "0.001"


def test_mean_and_std_match_a_hand_computation(study) -> None:
    root, _, md = study
    rte = section(md, "### rte (main metric: accuracy)")
    results = [json.loads((root / "results" / f"rte__lora__lr-0.001_seed-{s}.json").read_text()) for s in SEEDS]
    final = [r["metrics"]["eval"]["single"]["accuracy"] for r in results]
    best = [r["metrics"]["best_epoch"]["test"]["single"]["accuracy"] for r in results]
    ece = [r["metrics"]["eval"]["single"]["ece"] for r in results]
    expected = f"{np.mean(final) * 100:.2f} ± {np.std(final, ddof=1) * 100:.2f}"
    assert cell(rte, "LoRA", "test accuracy (final)") == expected
    assert cell(rte, "LoRA", "test accuracy (final)") == "70.00 ± 1.00"
    assert cell(rte, "LoRA", "test accuracy (best-val epoch)") == f"{np.mean(best) * 100:.2f} ± 1.00"
    assert cell(rte, "LoRA", "ECE (%)") == f"{np.mean(ece) * 100:.2f} ± {np.std(ece, ddof=1) * 100:.2f}"
    assert cell(rte, "LoRA", "n seeds") == "3"


def test_temperature_scaling_fixes_overconfidence(study) -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(0, 1.5, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-latent))).astype(int)
    probs = np.asarray(_overconfident(rng, latent, 3.0))
    t = fit_temperature(probs, labels)
    nll = lambda p: float(-np.log(p[np.arange(len(labels)), labels]).mean())  # noqa: E731
    assert 2.0 < t < 4.0 and nll(apply_temperature(probs, t)) < nll(probs)
    root, _, md = study
    rte = section(md, "### rte (main metric: accuracy)")
    name = "LoRA + temperature scaling"
    assert float(cell(rte, name, "T").split(" ")[0]) > 1.0
    runs = [json.loads((root / "results" / f"rte__lora__lr-0.001_seed-{s}.json").read_text()) for s in SEEDS]
    before = np.mean([-np.log(np.asarray(r["predictions"]["test"]["single_probs"])[
        np.arange(N_TEST), r["predictions"]["test"]["label"]]).mean() for r in runs])
    assert float(cell(rte, name, "NLL").split(" ")[0]) < before


def test_deep_ensemble_averages_probabilities(study) -> None:
    root, _, md = study
    runs = [json.loads((root / "results" / f"rte__lora__lr-0.001_seed-{s}.json").read_text()) for s in SEEDS]
    probs = np.mean([np.asarray(r["predictions"]["test"]["single_probs"]) for r in runs], axis=0)
    labels = np.asarray(runs[0]["predictions"]["test"]["label"])
    accuracy = (probs.argmax(1) == labels).mean()
    nll = -np.log(probs[np.arange(len(labels)), labels]).mean()
    rte = section(md, "### rte (main metric: accuracy)")
    name = f"Deep ensemble of k=3 LoRAs (seeds 0,1,2, {N_TEST} test examples)"
    assert cell(rte, name, "accuracy") == f"{accuracy * 100:.2f}"
    assert cell(rte, name, "NLL") == f"{nll:.4f}"
    assert cell(rte, name, "T") == "–"


def test_claim_verdicts(study) -> None:
    assert verdict(5.0, 0.8, +1) == "agree" and verdict(-5.0, 0.8, +1) == "disagree"
    assert verdict(0.5, 0.8, +1) == "unclear" and verdict(-2.0, 0.8, -1) == "agree"
    assert verdict(1.0, math.nan, +1) == "unclear"
    assert match_verdict(0.3, 0.8) == "agree" and match_verdict(-2.0, 0.8) == "disagree"
    _, _, md = study
    claims = section(md, "## Claims")

    def verdict_of(claim_prefix: str) -> str:
        line = next(line for line in claims.splitlines() if line.startswith(f"| {claim_prefix}"))
        return [c.strip() for c in line.strip().strip("|").split("|")][3]

    assert verdict_of("C1 (rte)") == "agree"  # +5 points, SE 0.82
    assert verdict_of("C1 (mrpc)") == "disagree"  # -5 points
    assert verdict_of("C1 (average)") == "unclear"  # 0 points
    assert verdict_of("C2") == "agree" and verdict_of("C4") == "agree"  # ECE 5% vs 12%
    # adalora on rte has one seed (no SE): rte is left out of the verdict, which mrpc decides (LD 75 vs AdaLoRA 78)
    assert verdict_of("C3a") == "disagree" and "left out (one seed on a side): rte" in claims
    assert verdict_of("C5") == "agree" and verdict_of("C6") == "agree"
    assert verdict_of("C8") == "agree" and verdict_of("C9") == "agree"
    assert "argmax p=0.5" in claims


def test_missing_runs_say_not_run_and_regression_has_no_calibration(tmp_path: Path) -> None:
    for seed in SEEDS:
        _write(tmp_path / "r", make_result("rte", "lora", 1e-3, seed, (0.7, None)))
        _write(tmp_path / "r", make_result("stsb", "lora", 1e-3, seed, (0.85, None), metric="pearson"))
    md = write_report([tmp_path / "r"], tmp_path / "R.md", plots_dir=tmp_path / "figs").read_text()
    assert "--plots" in md and "(figs/rte_reliability.png)" in md and (tmp_path / "figs" / "rte_loss_gap.png").is_file()
    claims = section(md, "## Claims")
    verdicts = [[c.strip() for c in line.strip().strip("|").split("|")][3] for line in claims.splitlines()
                if line.startswith("| C")]
    assert len(verdicts) >= 11 and set(verdicts) == {"not run"}
    stsb = section(md, "### stsb (main metric: pearson)")
    assert "ECE (%)" not in header(stsb) and cell(stsb, "LoRA", "test pearson (final)") == "85.00 ± 1.00"
    assert cell(stsb, "Deep ensemble of k=3 LoRAs (seeds 0,1,2, 80 test examples)", "test pearson") != "–"


def test_plots_exist_and_are_linked(study) -> None:
    root, output, md = study
    plots = root / "docs" / "REPORT_plots"
    names = {p.name for p in plots.glob("*.png")}
    for name in ("rte_reliability.png", "mrpc_reliability.png", "rte_ece_over_training.png", "rte_loss_gap.png",
                 "mrpc_sensitivity.png", "mrpc_strategies.png"):
        assert name in names and (plots / name).stat().st_size > 1000, name
        assert f"(REPORT_plots/{name})" in md


def test_regenerating_is_deterministic(study) -> None:
    root, output, md = study
    again = write_report([root / "results"], output, plots_dir=None).read_text(encoding="utf-8")
    assert again == md


def test_no_results_is_a_usage_error(tmp_path: Path) -> None:
    from loradrop.errors import UsageError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no successful sweep results"):
        write_report([tmp_path / "empty"], tmp_path / "R.md")
    with pytest.raises(UsageError, match="do not exist"):
        write_report([tmp_path / "missing"], tmp_path / "R.md")


def test_command_line_writes_the_same_report(study, tmp_path: Path, capsys) -> None:
    from loradrop.cli import main

    root, _, text = study
    out = tmp_path / "CLI.md"
    assert main(["report", str(root / "results"), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    # the same content as the Python call (only the report's own paths may differ)
    cli_text = out.read_text(encoding="utf-8").replace("CLI_plots/", "REPORT_plots/")
    assert cli_text.split("\n## ")[2:] == text.split("\n## ")[2:]
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "x.md")]) == 2
    assert capsys.readouterr().err.startswith("loradrop report: error:")


def test_model_names_label_a_recorded_model(study, tmp_path: Path, capsys) -> None:
    """`--model-name RECORDED=NAME` shows a model the runs recorded (e.g. a local folder) under a name, keeps the
    regenerate command true, and refuses a model no run recorded, or a malformed pair, in one line (exit 2)."""
    from loradrop.cli import main

    root, _, text = study
    assert "Model: minilm-l6 (" in text  # as the runs recorded it
    out = tmp_path / "N.md"
    assert main(["report", str(root / "results"), "-o", str(out), "--model-name", "minilm-l6=all-MiniLM-L6-v2"]) == 0
    named = out.read_text(encoding="utf-8")
    assert "Model: all-MiniLM-L6-v2 (" in named and "minilm-l6" not in named.split("## Limitations")[1]
    assert f"-o {out} --model-name=minilm-l6=all-MiniLM-L6-v2`" in named  # the regenerate line
    capsys.readouterr()
    assert main(["report", str(root / "results"), "-o", str(tmp_path / "x.md"), "--model-name", "/tmp/x=y"]) == 2
    err = capsys.readouterr().err
    assert "no run recorded the model '/tmp/x'; the runs recorded: minilm-l6" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.md").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(root / "results"), "--model-name", "minilm"])
    assert exit_info.value.code == 2 and "expected RECORDED=NAME" in capsys.readouterr().err


def _uncertainty(seed: int, *, alpha: float = 0.1, shift: float = 0.0) -> dict:
    """The `uncertainty` section `loradrop.app.acting` computes (the real functions) on synthetic prediction rows."""
    from loradrop.app.acting import conformal_section, ood_section, selective_section
    from loradrop.ensemble import entropy

    rng = np.random.default_rng(seed + 17)

    def rows(n: int, scale: float, labelled: bool) -> list[dict]:
        latent = rng.normal(0, 1.5, n)
        labels = (rng.random(n) < 1 / (1 + np.exp(-latent))).astype(int)
        out = []
        for z, y, member in zip(latent, labels, rng.normal(0, 0.4, (n, 2)), strict=True):
            single = 1 / (1 + np.exp(-scale * (z + shift))), 1 / (1 + np.exp(-scale * (z + shift + member).mean()))
            probs = [[1 - p, p] for p in single]
            out.append({"label": int(y) if labelled else 0, "single_probs": probs[0], "ensemble_probs": probs[1],
                        "single_pred": int(single[0] > 0.5), "ensemble_pred": int(single[1] > 0.5),
                        "uncertainty": {"entropy": float(entropy(torch.tensor(probs[1]))),
                                        "mutual_information": float(abs(member[0] - member[1]) / 10)}})
        return out

    ins, outs = rows(60, 2.0, True), rows(40, 0.5, False)
    return {"selective": selective_section(ins), "ood": ood_section(ins, outs, task="mrpc"),
            "conformal": conformal_section(ins, alpha, seed=seed)}


def test_uncertainty_section_is_mean_and_std_over_the_chosen_seeds(tmp_path: Path) -> None:
    sections = {}
    for seed in SEEDS:
        for method, lr in (("lora", 1e-3), ("lora", 1e-4), ("ld_paper", 1e-3)):
            result = make_result("rte", method, lr, seed, MAIN[("rte", method)])
            if not (method == "ld_paper" and seed == 2):  # one seed without the section: n = 2
                part = _uncertainty(seed, shift=0.0 if lr == 1e-3 else 3.0)
                result["metrics"]["uncertainty"] = sections[(method, lr, seed)] = part
            _write(tmp_path / "r", result)
    md = write_report([tmp_path / "r"], tmp_path / "R.md").read_text(encoding="utf-8")
    text = section(md, "## Acting on uncertainty")
    assert "ood_task" in text and "conformal_alpha" in text

    def stat(values: list[float], scale: float, digits: int) -> str:
        return f"{np.mean(values) * scale:.{digits}f} ± {np.std(values, ddof=1) * scale:.{digits}f}"

    def matching(table: str, **cells: str) -> dict[str, str]:
        lines = [line for line in table.splitlines() if line.startswith("|")]
        head = _cells(lines[0])
        found = [dict(zip(head, _cells(line), strict=True)) for line in lines[2:]]
        found = [r for r in found if all(r[k] == v for k, v in cells.items())]
        assert len(found) == 1, (cells, table)
        return found[0]

    lora = [sections[("lora", 1e-3, s)] for s in SEEDS]  # lr 1e-3 is chosen: the lr 1e-4 runs take no part
    selective = section(md, "### Selective prediction on rte")
    mi = matching(selective, method="lora", score="ensemble_mutual_information")
    scores = [s["selective"]["scores"]["ensemble_mutual_information"] for s in lora]
    assert mi["lr"] == "0.001" and mi["n"] == "3"
    assert mi["AURC"] == stat([s["aurc"] for s in scores], 1, 4)
    assert mi["E-AURC"] == stat([s["eaurc"] for s in scores], 1, 4)
    assert mi["coverage @ 90% acc. (%)"] == stat([s["coverage_at_accuracy"]["0.9"]["coverage"] for s in scores],
                                                 100, 2)
    assert matching(selective, method="ld_paper", score="single_max_prob")["n"] == "2"
    ood = matching(section(md, "### OOD detection on rte"), method="lora", score="ensemble_entropy")
    assert ood["OOD task"] == "mrpc"
    assert ood["AUROC (%)"] == stat([s["ood"]["scores"]["ensemble_entropy"]["auroc"] for s in lora], 100, 2)
    assert ood["FPR@95 (%)"] == stat([s["ood"]["scores"]["ensemble_entropy"]["fpr_at_95_tpr"] for s in lora], 100, 2)
    conformal = matching(section(md, "### Conformal sets on rte"), method="lora", sets="APS", **{"pass": "ensemble"})
    assert conformal["alpha"] == "0.1" and conformal["calibration"] == "eval_half"
    assert conformal["coverage (%)"] == stat([s["conformal"]["ensemble"]["aps"]["coverage"] for s in lora], 100, 2)
    assert conformal["mean set size"] == stat([s["conformal"]["ensemble"]["aps"]["mean_set_size"] for s in lora],
                                              1, 3)


def test_uncertainty_section_keeps_alphas_apart_and_is_absent_without_data(study, tmp_path: Path) -> None:
    assert "## Acting on uncertainty" not in study[2]  # no run of the main fixture has the section
    for seed in SEEDS:
        result = make_result("rte", "lora", 1e-3, seed, MAIN[("rte", "lora")])
        result["metrics"]["uncertainty"] = {"conformal": _uncertainty(seed, alpha=0.1 if seed else 0.3)["conformal"]}
        _write(tmp_path / "r", result)
    md = write_report([tmp_path / "r"], tmp_path / "R.md").read_text(encoding="utf-8")
    text = section(md, "## Acting on uncertainty")
    assert "### Selective prediction" not in text and "### OOD detection" not in text
    rows = [_cells(line) for line in section(md, "### Conformal sets on rte").splitlines() if line.startswith("|")][2:]
    assert {(r[3], r[-1]) for r in rows} == {("0.1", "2"), ("0.3", "1")}  # (alpha, n): never averaged together


def test_deep_ensemble_is_not_formed_across_different_test_splits(tmp_path: Path) -> None:
    # QNLI / SQuAD here: the dev set is split by the run's seed, so each seed tests on other examples (and trains on
    # some of the others' test examples): averaging them would not be a test score
    for seed in SEEDS:
        result = make_result("rte", "lora", 1e-3, seed, (0.7, None))
        test = result["predictions"]["test"]
        test["id"] = [i + 10 * seed for i in test["id"]]  # shifted ids: only part of each test set is shared
        _write(tmp_path / "r", result)
    md = write_report([tmp_path / "r"], tmp_path / "R.md", plots_dir=tmp_path / "figs").read_text()
    rte = section(md, "### rte (main metric: accuracy)")
    assert "Deep ensemble of k=3 LoRAs (seeds" not in rte
    assert "Deep ensemble of k=3 LoRAs: not formed: the `lora` seeds were tested on different examples" in rte
    assert f"{N_TEST - 20} examples are common" in rte


def test_the_glue_average_leaves_out_other_tasks(tmp_path: Path) -> None:
    # a task outside GLUE (SQuAD in the study; the tweets corpus here) gets its own C1 row but does not enter
    # "LoRA Dropout beats LoRA on GLUE tasks"
    for seed in SEEDS:
        for task, method, main in (("rte", "lora", (0.70, 0.68)), ("rte", "ld_paper", (0.74, 0.75)),
                                   ("tweets", "lora", (0.60, 0.58)), ("tweets", "ld_paper", (0.40, 0.40))):
            _write(tmp_path / "r", make_result(task, method, 1e-3, seed, main))
    claims = section(write_report([tmp_path / "r"], tmp_path / "R.md", plots_dir=tmp_path / "figs").read_text(),
                     "## Claims")
    average = next(line for line in claims.splitlines() if line.startswith("| C1 (average)"))
    assert "our GLUE tasks: rte (" in average and "tweets" not in average and "+5.00" in average
    assert "disagree" in next(line for line in claims.splitlines() if line.startswith("| C1 (tweets)"))
    # without a GLUE task (the LLM studies) the paper's GLUE rows (C1 average, C2 and C4 on RTE) are left out
    for path in (tmp_path / "r").glob("rte__*.json"):
        path.unlink()
    claims = section(write_report([tmp_path / "r"], tmp_path / "R2.md", plots_dir=tmp_path / "figs2").read_text(),
                     "## Claims")
    rows = [line.split("|")[1].split(":")[0].strip() for line in claims.splitlines() if line.startswith("| C")]
    assert "C1 (tweets)" in rows and not {"C1 (average)", "C2", "C4"} & set(rows) and "C7" in rows


def test_a_plans_select_from_takes_the_reports_choice(study, tmp_path: Path) -> None:
    """Phase 2 of a study (`select_from`) trains each task/method at the lr (and ld_1x's local axes) the report
    chooses in the phase-1 results; an explicit task/method setting still wins; a missing task/method is one line."""
    from loradrop.app.sweep import SweepPlan
    from loradrop.errors import SettingsError

    folder, _, _ = study
    plan_file = tmp_path / "main.yaml"
    plan_file.write_text(
        f"name: phase2\nselect_from: {folder}\nbase: {{model: minilm, epochs: 3}}\n"
        "grid: {task: [rte], seed: [3, 4]}\n"
        "methods: {adalora: {}, ld_1x: {samples: 1}, lora: {no_lora_dropout: true}}\n"
        "task_settings: {rte/lora: {lr: 0.05}}\n", encoding="utf-8")
    runs = {(r.method, r.axes["seed"]): r.settings for r in SweepPlan.load(plan_file).runs()}
    assert runs[("adalora", 3)]["lr"] == 0.001  # the common-seed rule's choice (test_lr_is_chosen_on_the_common_seeds)
    assert runs[("ld_1x", 4)]["lr"] == 0.0001 and runs[("ld_1x", 4)]["p"] == 0.3  # lr and p chosen jointly
    assert runs[("lora", 3)]["lr"] == 0.05  # explicit task/method setting beats the selection
    plan_file.write_text(plan_file.read_text(encoding="utf-8").replace("task: [rte]", "task: [rte, cola]"),
                         encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        SweepPlan.load(plan_file)
    assert str(info.value).count("no results") == 3 and "task 'cola', method 'adalora'" in str(info.value)
    kept = SweepPlan.load(plan_file, only=["rte__*"]).runs()  # --only: the tasks phase 1 finished still run
    assert {r.axes["task"] for r in kept} == {"rte"} and len(kept) == 6


def test_select_from_refuses_an_unfinished_or_failed_phase_one_and_a_changed_choice(tmp_path: Path) -> None:
    """Phase 1 named by its plan: a task/method with a phase-1 run still missing (or failed) is refused instead of
    choosing from the runs that happen to be there; a finished phase-2 run trained at another lr is refused too."""
    import shutil

    from loradrop.app.sweep import SweepPlan, pending
    from loradrop.errors import SettingsError, UsageError

    tune = tmp_path / "tune"
    for lr in LRS:
        _write(tune, make_result("rte", "lora", lr, 0, (0.7, 0.72)))
    (tmp_path / "tune.yaml").write_text(
        "name: p1\nresults: tune\nbase: {model: minilm}\ngrid: {task: [rte], lr: [0.0001, 0.001, 0.01], seed: [0]}\n"
        "methods: {lora: {no_lora_dropout: true}}\n", encoding="utf-8")
    main = tmp_path / "main.yaml"
    main.write_text("name: p2\nresults: main\nselect_from: tune.yaml\nbase: {model: minilm}\n"
                    "grid: {task: [rte], seed: [1]}\nmethods: {lora: {no_lora_dropout: true}}\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"phase 1 is not finished for task 'rte', method 'lora' \(1 of its runs "
                                            r"have no result, e\.g\. 'rte__lora__lr-0\.01_seed-0'\)"):
        SweepPlan.load(main)
    _write(tune, make_result("rte", "lora", 0.01, 0, (0.7, 0.72), validation=0.99))
    plan = SweepPlan.load(main)
    assert [r.settings["lr"] for r in plan.runs()] == [0.01]  # the best validation, now that all three finished
    # a phase-2 result trained at another lr (phase 1 changed since) is refused, not mixed with the new choice
    _write(tmp_path / "main", {**make_result("rte", "lora", 0.001, 1, (0.7, 0.72)), "run_id": "rte__lora__seed-1"})
    with pytest.raises(UsageError, match=r"rte__lora__seed-1 \(lr 0\.001 -> 0\.01\)"):
        pending(plan, tmp_path / "main")
    shutil.rmtree(tmp_path / "main")
    (tune / "rte__lora__lr-0.0001_seed-0.json").rename(tune / "rte__lora__lr-0.0001_seed-0.failed.json")
    (tmp_path / "tune.yaml").write_text((tmp_path / "tune.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    failed = tmp_path / "main2.yaml"
    failed.write_text(main.read_text(encoding="utf-8").replace("select_from: tune.yaml", "select_from: tune"),
                      encoding="utf-8")
    with pytest.raises(SettingsError, match=r"not finished for task 'rte', method 'lora' \(rte__lora__lr-0\.0001_"
                                            r"seed-0\.failed\.json failed\)"):
        SweepPlan.load(failed)  # a results folder: the failed run is seen


def test_settled_only_runs_the_task_methods_phase_one_finished(tmp_path: Path, capsys) -> None:
    """`--settled-only`: a phase 2 runs beside the end of its phase 1. A task/method whose phase-1 runs are not all
    done waits (named, with the missing run), the others run at their choice; without it the plan is refused; a
    task/method phase 1 never planned is still an error."""
    from loradrop.app.sweep import SweepPlan
    from loradrop.cli import main
    from loradrop.errors import SettingsError

    for lr in LRS:
        _write(tmp_path / "tune", make_result("rte", "ld_1x", lr, 0, (0.7, 0.72)))
        if lr != 1e-3:  # lora at 1e-3 still to run
            _write(tmp_path / "tune", make_result("rte", "lora", lr, 0, (0.7, 0.72)))
    (tmp_path / "tune.yaml").write_text(
        "name: p1\nresults: tune\nbase: {model: minilm}\ngrid: {task: [rte], lr: [0.0001, 0.001], seed: [0]}\n"
        "methods: {lora: {no_lora_dropout: true}, ld_1x: {samples: 1}}\n", encoding="utf-8")
    main_plan = tmp_path / "main.yaml"
    main_plan.write_text("name: p2\nresults: main\nselect_from: tune.yaml\nbase: {model: minilm}\n"
                         "grid: {task: [rte], seed: [1, 2]}\n"
                         "methods: {lora: {no_lora_dropout: true}, ld_1x: {samples: 1}}\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="phase 1 is not finished for task 'rte', method 'lora'"):
        SweepPlan.load(main_plan)
    plan = SweepPlan.load(main_plan, settled_only=True)
    assert [(r.method, r.axes["seed"], r.settings["lr"]) for r in plan.runs()] == [("ld_1x", 1, 0.001),
                                                                                  ("ld_1x", 2, 0.001)]
    assert list(plan.waiting) == [("rte", "lora")] and "rte__lora__lr-0.001_seed-0" in plan.waiting[("rte", "lora")]
    assert main(["sweep", str(main_plan), "--dry-run", "--settled-only"]) == 0
    out = capsys.readouterr().out
    assert "waiting for phase 1: rte/lora (1 of its runs have no result" in out
    assert "rte__ld_1x__seed-1\nrte__ld_1x__seed-2\n2 to run, 0 done already" in out
    # phase 1's finished runs estimate phase 2's time and memory (so --deadline can hold back its first runs)
    from loradrop.app.sweep import measured_for
    from loradrop.app.sweep_schedule import estimate

    measured = measured_for(plan, tmp_path / "main")
    assert len(measured) == 3 and estimate("rte", "ld_1x", plan.runs()[0].settings, measured).seconds == 120.0
    _write(tmp_path / "tune", make_result("rte", "lora", 1e-3, 0, (0.7, 0.72)))  # phase 1 done: nothing waits
    plan = SweepPlan.load(main_plan, settled_only=True)
    assert not plan.waiting and len(plan.runs()) == 4
    main_plan.write_text(main_plan.read_text(encoding="utf-8").replace("task: [rte]", "task: [rte, cola]"),
                         encoding="utf-8")
    with pytest.raises(SettingsError, match="no results .* task 'cola', method 'lora'"):
        SweepPlan.load(main_plan, settled_only=True)  # never planned in phase 1: not a wait, an error


def test_laplace_is_reported_on_loras_chosen_model(tmp_path: Path) -> None:
    """Laplace-LoRA is post hoc on LoRA's chosen runs: where a fit is missing at LoRA's chosen rate, its own best
    rate is shown with a note saying it is another model; with fits at every rate, the two choices are the same."""
    from loradrop.app.report_tables import Study
    from loradrop.app.results import load_results

    for lr in (1e-4, 1e-3):  # validation: lr 1e-3 is LoRA's choice (make_result)
        for seed in SEEDS:
            _write(tmp_path / "r", make_result("rte", "lora", lr, seed, (0.7, None)))
    for seed in SEEDS:
        _write(tmp_path / "r", make_result("rte", "laplace", 1e-4, seed, (0.7, 0.72)))
    study = Study(load_results([tmp_path / "r"]).runs)
    (lora,), (lap,) = study.choices[("rte", "lora")], study.choices[("rte", "laplace")]
    assert lora.lr == 1e-3 and lap.lr == 1e-4 and "no Laplace result at LoRA's chosen lr 0.001" in lap.note
    md = write_report([tmp_path / "r"], tmp_path / "R.md").read_text()
    assert "no Laplace result at LoRA's chosen lr 0.001" in md
    for seed in SEEDS:
        _write(tmp_path / "r", make_result("rte", "laplace", 1e-3, seed, (0.7, 0.72)))
    (lap,) = Study(load_results([tmp_path / "r"]).runs).choices[("rte", "laplace")]
    assert lap.lr == 1e-3 and lap.note == "" and [r.seed for r in lap.runs] == list(SEEDS)
    # a Laplace result records the fit's settings, not its LoRA run's training: the limitations read the LoRA runs
    for seed in SEEDS:
        result = make_result("rte", "laplace", 1e-3, seed, (0.7, 0.72))
        result["settings"]["max_seq_len"] = None
        _write(tmp_path / "r", result)
    limits = write_report([tmp_path / "r"], tmp_path / "R.md").read_text().split("## Limitations")[1]
    assert "max_seq_len 128," in limits and "1 of them of the paper's 8 GLUE tasks" in limits
    assert "with the GLUE dev split scored as test" in limits
