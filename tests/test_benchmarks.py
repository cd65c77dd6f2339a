"""The benchmark scripts run end to end on a tiny setting and their output renders as tables (timings are not
asserted: speed is measured by the scripts, not by tests)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_step_op_count_and_tables(tmp_path):
    out = tmp_path / "results"
    common = ["--device", "cpu", "--model", "llama", "--llama-size", "small", "--seq-len", "16", "--batch", "1"]
    run("train_step.py", *common, "--steps", "1", "--warmup", "0", "--repeats", "1", "--no-memory",
        "--configs", "ab_s1_batch,ab_s4_chunk2,input_s1", "--out", str(out / "train_step_cpu.json"))
    data = json.loads((out / "train_step_cpu.json").read_text())
    names = [c["name"] for c in data["runs"][0]["configs"]]
    assert names == ["peft_lora", "ab_s1_batch", "ab_s4_chunk2", "input_s1"]
    assert all(c["time_s"]["median"] > 0 for c in data["runs"][0]["configs"])
    assert data["versions"]["loradrop"] and data["hardware"]["cpu_cores"] >= 1

    run("op_count.py", "--device", "cpu", "--model", "llama", "--seq-len", "16", "--batch", "1",
        "--out", str(out / "op_count_cpu.json"))
    ops = {c["name"]: c for c in json.loads((out / "op_count_cpu.json").read_text())["runs"][0]["configs"]}
    assert ops["peft_lora"]["aten_ops_vs_plain"] == 1.0
    assert ops["ab_s4_accum"]["aten_ops"] > 3 * ops["ab_s1_batch"]["aten_ops"]  # 4 passes against one

    doc = tmp_path / "PERF.md"
    run("make_table.py", "--results", str(out), "--write", str(doc))
    text = doc.read_text()
    assert "samples=4 in 2 chunks" in text and "Operators dispatched per training step" in text
    assert "samples=1 time ≤ 1.05× plain LoRA" in text
