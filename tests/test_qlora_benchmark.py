"""benchmarks/qlora_step.py (the GPU QLoRA step-time measurement, issue #13) runs: its --help always, a tiny
configuration on bitsandbytes' CPU backend when bitsandbytes is installed (its p = 0 parity check included)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qlora_step.py"


def test_help_names_the_variants():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for variant in ("qlora", "qlora_peft_dropout", "ld_s1", "ld_s4"):
        assert variant in out


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (optional: pip install 'loradrop[qlora]')")
def test_tiny_cpu_run_checks_parity_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("qlora_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "q.json"
    module.main(["--device", "cpu", "--hidden", "64", "--intermediate", "128", "--layers", "1", "--heads", "2",
                 "--seq", "8", "--batch", "2", "--vocab", "64", "--warmup", "0", "--steps", "1",
                 "--variants", "qlora", "ld_s4", "--out", str(out)])
    result = json.loads(out.read_text())
    parity = result["parity_p0"]
    assert parity["bnb_layers_adapted"] == 7  # q/k/v/o/gate/up/down of the one layer are PEFT bnb layers
    assert parity["loss_equal"] and parity["grads_equal"] and parity["eval_logits_equal"]
    assert parity["grads_compared"] == 14
    assert set(result["results"]) == {"qlora", "ld_s4"}
    assert result["results"]["qlora"]["step_ratio_vs_qlora"] == 1.0
    assert result["versions"]["bitsandbytes"]
