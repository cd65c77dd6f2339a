"""Profile one training step of chosen `train_step.py` configurations and print where the time goes.

For each configuration: warm-up steps, then the mean wall time of a few timed steps, then one step under
`torch.profiler` (CPU and, on CUDA, GPU activity) summarised as the top operators by self CPU time and by GPU
time. Writes the summaries as text files when --out-dir is given.

    python benchmarks/profile_step.py --device cuda --model minilm --configs peft_lora,ab_s1_batch --out-dir /tmp/p
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
from train_step import Bench, selected_configs  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", choices=["minilm", "llama"], default="minilm")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--llama-size", choices=sorted(bc.LLAMA_PRESETS), default="small")
    ap.add_argument("--configs", default="peft_lora,ab_s1_batch")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    bench = Bench(args.model, args.seq_len, args.batch, args.device, dtype, args.llama_size, args.model == "minilm")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for cfg in selected_configs(args.configs):
        with bc.configured(bench.model, cfg):
            bench.run(cfg, 3)
            bc.sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                bench.step(cfg.get("accum", 1))
            bc.sync(args.device)
            wall = (time.perf_counter() - start) / args.steps
            with profile(activities=activities) as prof:
                bench.step(cfg.get("accum", 1))
                bc.sync(args.device)
        averages = prof.key_averages()
        text = [f"== {cfg['name']}: {1e3 * wall:.2f} ms/step (mean of {args.steps})",
                averages.table(sort_by="self_cpu_time_total", row_limit=args.rows)]
        if args.device == "cuda":
            text.append(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))
        report = "\n".join(text)
        print(report, flush=True)
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.out_dir) / f"profile_{args.model}_{cfg['name']}.txt").write_text(report)


if __name__ == "__main__":
    main()
