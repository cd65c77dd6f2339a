"""Split loradrop's GPU step overhead into its parts (the diagnostic behind docs/PERFORMANCE.md's hot-path notes).

Interleaved rounds of 25 timed optimizer steps (MiniLM architecture or the 271M Llama, seq 128, batch 2, bf16 autocast)
for: plain PEFT LoRA; loradrop "ab" p=0.5; loradrop with p=0 (variant, hooks and plan, but PEFT's own math); "ab"
with the model hooks removed (layers plan their own calls); plain and "ab" with Python's garbage collector off.
Prints the median ms per step of each; writes nothing.

    python benchmarks/overhead_split.py minilm     # or: llama
"""

from __future__ import annotations

import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loradrop  # noqa: E402
from loradrop.model import _find_controller, _hook_targets  # noqa: E402
from train_step import Bench  # noqa: E402

VARIANTS = ["plain", "ab", "p0", "ab_nohooks", "plain_nogc", "ab_nogc"]


def configure(bench: Bench, name: str) -> None:
    if _find_controller(bench.model) is not None:
        loradrop.remove_lora_dropout(bench.model)
    if name.startswith(("ab", "p0")):
        p = 0.0 if name.startswith("p0") else 0.5
        loradrop.apply_lora_dropout(bench.model, loradrop.LoraDropoutConfig(p=p, seed=0))
    if name == "ab_nohooks":
        controller = loradrop.get_controller(bench.model)
        for hooked in _hook_targets(bench.model):
            for registry in (hooked._forward_pre_hooks, hooked._forward_hooks):
                for key in [k for k, hook in registry.items() if getattr(hook, "__self__", None) is controller]:
                    del registry[key]


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "minilm"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bench = Bench(model, 128, 2, device, dtype, "base" if device == "cuda" else "small", True)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(6):
        for name in VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]:
            configure(bench, name)
            if name.endswith("nogc"):
                gc.disable()
            try:
                bench.run({}, 3)
                times[name] += [1e3 * statistics.mean(bench.run({}, 25))]
            finally:
                gc.enable()
    for name in VARIANTS:
        print(f"{model} {name:12s} median {statistics.median(times[name]):8.2f} ms/step  rounds "
              + " ".join(f"{t:.1f}" for t in times[name]))


if __name__ == "__main__":
    main()
