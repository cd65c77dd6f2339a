"""Dispatch counts and host synchronisations of one training step (issue #6's "hot path" evidence).

When a GPU waits on the host (small models, small batches), step time follows the number of operators the step
dispatches, not its FLOPs. For every training configuration of `train_step.py` this script profiles one optimizer
step (forward + backward + AdamW) with `torch.profiler` and counts the aten operators dispatched and, on CUDA, the
GPU kernels launched. On CUDA it also runs forward + backward under ``torch.cuda.set_sync_debug_mode("error")``,
which raises on any host-device synchronisation, and records whether one happened.

    python benchmarks/op_count.py --device cpu --model minilm --out benchmarks/results/op_count_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
from train_step import CONFIGS, REFERENCE, Bench  # noqa: E402


def count_step(bench: Bench, cfg: dict[str, Any], device: str) -> dict[str, int]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        bench.step(cfg.get("accum", 1))
        bc.sync(device)
    events = prof.events()
    aten = sum(1 for e in events if e.name.startswith("aten::"))
    kernels = sum(1 for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return {"aten_ops": aten, "gpu_kernels": kernels if device == "cuda" else None}


def sync_check(bench: Bench, cfg: dict[str, Any]) -> str:
    """'none', or the error raised by the first host synchronisation in forward + backward."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with bc.autocast(bench.device, bench.dtype):
            loss = bench.forward(**bench.batch).loss
        loss.backward()
    except RuntimeError as err:
        return f"sync: {str(err).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        bench.optimizer.zero_grad(set_to_none=True)
    return "none"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", nargs="+", choices=["minilm", "llama"], default=["minilm"])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--llama-size", choices=sorted(bc.LLAMA_PRESETS), default="small")
    ap.add_argument("--minilm-random", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    payload = bc.header("op_count", args.device, {"settings": {"seq_len": args.seq_len, "batch": args.batch,
                                                                "dtype": str(dtype).replace("torch.", ""),
                                                                "llama_size": args.llama_size}, "runs": []})
    for model in args.model:
        bench = Bench(model, args.seq_len, args.batch, args.device, dtype, args.llama_size, args.minilm_random)
        rows = []
        for cfg in CONFIGS:
            with bc.configured(bench.model, cfg):
                bench.run(cfg, 2)  # warm-up: optimizer state, caches
                row = {"name": cfg["name"], "label": cfg["label"], **count_step(bench, cfg, args.device)}
                if args.device == "cuda":
                    row["host_syncs_in_forward_backward"] = sync_check(bench, cfg)
            rows.append(row)
            print(f"{model} {cfg['name']:<14} aten ops {row['aten_ops']:6d}  kernels {row['gpu_kernels']}  "
                  f"syncs {row.get('host_syncs_in_forward_backward', '-')}", flush=True)
        ref = next(r for r in rows if r["name"] == REFERENCE)
        for row in rows:
            row["aten_ops_vs_plain"] = row["aten_ops"] / ref["aten_ops"]
            if row["gpu_kernels"]:
                row["gpu_kernels_vs_plain"] = row["gpu_kernels"] / ref["gpu_kernels"]
        payload["runs"].append({"model": model, "model_info": bench.info, "configs": rows})
        del bench
        bc.cleanup(args.device)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
