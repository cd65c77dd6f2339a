"""Rebuild the step-time / memory table of `multi_gpu.txt` as JSON (`sharded_step_from_log.json`).

The benchmark's own JSON files did not come back from the GPU machine (README.md); this reads the lines
`benchmarks/sharded_step.py` printed for each configuration (`<config>: median step <s> s, memory {...}`: the median
step over the timed steps, the slower rank; memory of rank 0) under each strategy's `sharded_step <strategy>` header.

    python benchmarks/results/multi_gpu_h200x2/parse_log.py
"""

import ast
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
STRATEGY = re.compile(r"^sharded_step (\w+): rc=(-?\d+), (\d+) s")
CONFIG = re.compile(r"^(\w+): median step ([0-9.]+) s, memory (\{.*\})$")


def parse(text: str) -> dict:
    out: dict = {"source": "multi_gpu.txt (the printout of benchmarks/multi_gpu.sh)", "strategies": {}}
    current = None
    for line in text.splitlines():
        if m := STRATEGY.match(line):
            current = out["strategies"].setdefault(m.group(1), {"rc": int(m.group(2)), "seconds": int(m.group(3)),
                                                                "configs": {}})
        elif current is not None and (m := CONFIG.match(line)):
            current["configs"][m.group(1)] = {"median_step_s_max_over_ranks": float(m.group(2)),
                                              "rank0_memory": ast.literal_eval(m.group(3))}
        elif line.startswith("===="):
            current = None
    for strategy in out["strategies"].values():
        base = strategy["configs"].get("lora")
        for config in strategy["configs"].values():
            if base:
                key = "median_step_s_max_over_ranks"
                config["step_time_vs_lora"] = config[key] / base[key]
    return out


if __name__ == "__main__":
    data = parse((HERE / "multi_gpu.txt").read_text(encoding="utf-8"))
    (HERE / "sharded_step_from_log.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: {c: round(v["median_step_s_max_over_ranks"], 4) for c, v in s["configs"].items()}
                      for k, s in data["strategies"].items()}))
