"""The instruction-tuning study (#14) end to end at toy scale: studies/instruct/plan.yaml's shape (SFT on Alpaca ->
MMLU 0/5-shot, LoRA vs LoRA Dropout, several seeds) through `loradrop sweep` and `loradrop report`, with a tiny random
Llama (SmolLM2's tokenizer) on real Alpaca and MMLU slices: the report's MMLU table holds each method's single pass
and ensemble, mean ± std over seeds, and the paired difference to LoRA; the lr is chosen by the SFT validation loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from loradrop.app.report import write_report
from loradrop.app.sweep import SweepPlan, run_sweep

pytestmark = pytest.mark.slow

PLAN = Path(__file__).resolve().parents[2] / "studies" / "instruct" / "plan.yaml"


def cells(md: str, section: str, row: str) -> list[str]:
    """The cells of the Markdown table row starting with `row` after the heading `section`."""
    line = next(x for x in md[md.index(section):].splitlines() if x.startswith(f"| {row} "))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_instruct_plan_is_as_documented() -> None:
    plan = SweepPlan.load(PLAN)
    runs = plan.runs()
    assert len(runs) == 18  # the plan's comment: 2 tasks x 3 methods x 3 seeds
    assert {r.settings["task"] for r in runs} == {"alpaca", "lima"} and {r.method for r in runs} == {
        "lora", "ld_paper", "ld_1x"}
    assert {r.settings["model"] for r in runs} == {"smollm2"} and {r.axes["seed"] for r in runs} == {0, 1, 2}
    assert "max_eval_samples" not in plan.base  # the default MMLU subset, the one the comment describes


def test_instruct_sweep_reports_the_mmlu_table(data_root: Path, llama_dir: Path, tmp_path: Path) -> None:
    if not (data_root / "instruction" / "llamafactory" / "alpaca_en_demo.json").is_file():
        pytest.skip(f"no Alpaca demo file under {data_root}")
    plan = SweepPlan.load(PLAN)
    plan.grid = {"task": ["alpaca"], "seed": [0, 1]}
    plan.only = ["*__lora__*", "*__ld_paper__*"]
    plan.overrides = {"model": str(llama_dir), "max_train_samples": 8, "max_eval_samples": 6, "epochs": 1,
                      "batch_size": 4, "max_seq_len": 256, "ensemble": 2, "bf16": False, "lr": 1.0e-3}
    results = tmp_path / "res"
    assert run_sweep(plan, results, progress=False) == {"planned": 4, "skipped": 0, "ok": 4, "failed": [],
                                                        "deferred": []}
    data = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}
    evals = {k: v["metrics"]["eval"] for k, v in data.items()}
    assert all(e["single"]["mmlu_0shot"]["n"] == 6 and e["single"]["mmlu_5shot"]["n"] == 6 for e in evals.values())
    assert evals["alpaca__lora__seed-0"].get("ensemble") is None  # plain LoRA: no masks, no ensemble
    assert evals["alpaca__ld_paper__seed-0"]["ensemble"]["ensemble_size"] == 2

    # a second lr for LoRA with a worse SFT validation loss: the report keeps the first (selection by that loss)
    for seed in (0, 1):
        worse = json.loads((results / f"alpaca__lora__seed-{seed}.json").read_text())
        worse["axes"]["lr"] = worse["settings"]["lr"] = 5.0e-3
        worse["run_id"] = f"alpaca__lora__lr-0.005_seed-{seed}"
        worse["metrics"]["eval"]["single"]["sft_validation_loss"] += 1.0
        worse["metrics"]["eval"]["single"]["mmlu_0shot"]["accuracy"] = 1.0  # would show if this lr were reported
        (results / f"{worse['run_id']}.json").write_text(json.dumps(worse))

    md = write_report([results], tmp_path / "R.md").read_text(encoding="utf-8")
    assert "### SFT on alpaca -> MMLU" in md and "### alpaca (main metric" not in md  # no empty "test loss" table
    assert "## Results per task" not in md  # SFT only: no heading over nothing
    assert "| C1 (alpaca)" not in md  # an SFT task's LoRA comparison is C11 (MMLU), not a test-loss C1
    limits = md.split("## Limitations")[1]
    assert "GLUE dev split" not in limits and "none of them the paper's" in limits and "epochs 1," in limits
    # the section says how MMLU was scored: the plan's cloze form, not letters
    assert "then MMLU scored in cloze form (each choice's text after \"Answer:\", its mean token" in md
    assert "next-token" not in md.split("## MMLU after instruction tuning")[1].split("###")[0]
    assert "Deep ensemble" not in md  # per-seed question subsets: no ensemble across seeds
    lora = cells(md, "### SFT on alpaca", "LoRA")
    single = cells(md, "### SFT on alpaca", "LoRA Dropout (train only)")
    ensemble = cells(md, "### SFT on alpaca", "LoRA Dropout (train + test)")

    def stat(run: str, pass_: str, shot: str) -> str:
        values = [evals[f"alpaca__{run}__seed-{s}"][pass_][shot]["accuracy"] * 100 for s in (0, 1)]
        return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"

    assert lora[1] == "0.001" and lora[2] == stat("lora", "single", "mmlu_0shot") and lora[-1] == "2"
    assert lora[6] == stat("lora", "single", "mmlu_5shot")
    assert single[2] == stat("ld_paper", "single", "mmlu_0shot") and single[6] == stat("ld_paper", "single",
                                                                                          "mmlu_5shot")
    assert ensemble[2] == stat("ld_paper", "ensemble", "mmlu_0shot") and ensemble[6] == stat("ld_paper", "ensemble",
                                                                                              "mmlu_5shot")
    diffs = [(evals[f"alpaca__ld_paper__seed-{s}"]["ensemble"]["mmlu_5shot"]["accuracy"]
              - evals[f"alpaca__lora__seed-{s}"]["single"]["mmlu_5shot"]["accuracy"]) * 100 for s in (0, 1)]
    assert ensemble[7] == f"{np.mean(diffs):.2f} ± {np.std(diffs, ddof=1):.2f} (n=2)"
    # the paper's LLM claim, per shot setting: LoRA Dropout's ensemble against LoRA on MMLU after SFT
    c11 = next(line for line in md.splitlines() if line.startswith("| C11 (5-shot)"))
    assert (f"alpaca: LD (train + test) {stat('ld_paper', 'ensemble', 'mmlu_5shot')} vs LoRA "
            f"{stat('lora', 'single', 'mmlu_5shot')}") in c11
    losses = [evals[f"alpaca__lora__seed-{s}"]["single"]["sft_validation_loss"] for s in (0, 1)]
    assert lora[10] == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}"
    selection = cells(md, "## Selection protocol", "alpaca | lora")
    assert selection[3] == "lr 0.001" and f"lr 0.005: {np.mean(losses) + 1:.4f}" in selection[2]
    shutil.rmtree(tmp_path / "R_plots", ignore_errors=True)
