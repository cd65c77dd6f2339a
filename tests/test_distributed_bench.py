"""benchmarks/sharded_step.py runs through ``accelerate launch`` with the committed FSDP2 config in its tiny CPU
setting (2 processes, gloo): every configuration trains on both ranks, the ranks share rank 0's mask stream, and the
JSON carries what the lead's GPU run needs (timings are not asserted: the GPU run measures them)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_step_benchmark_under_accelerate_fsdp2_on_cpu(tmp_path: Path) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate command is not installed next to this Python")
    out = tmp_path / "sharded_step.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "configs/accelerate/fsdp2.yaml"), "--num_processes",
           "2", "--mixed_precision", "no", "--main_process_port", "0", str(ROOT / "benchmarks/sharded_step.py"),
           "--preset", "tiny", "--seq-len", "16", "--batch", "2", "--steps", "2", "--warmup", "1",
           "--configs", "lora,loradrop_s1,loradrop_s4,loradrop_s4_chunk1,loradrop_example", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and data["sharding"].startswith("fully_shard")
    assert data["versions"]["torch"] and data["versions"]["accelerate"]
    assert [r["name"] for r in data["results"]] == ["lora", "loradrop_s1", "loradrop_s4", "loradrop_s4_chunk1",
                                                  "loradrop_example"]
    for result in data["results"]:
        assert [r["rank"] for r in result["ranks"]] == [0, 1]
        assert all(len(r["step_s"]) == 2 and all(t > 0 for t in r["step_s"]) for r in result["ranks"])
        if result["loradrop"] is not None:  # seeds were drawn per rank; rank 0's stream was broadcast
            assert len({r["mask_seed"] for r in result["ranks"]}) == 1
            assert all(r["mask_step"] == 3 for r in result["ranks"])
        assert result["step_time_vs_lora"] > 0
