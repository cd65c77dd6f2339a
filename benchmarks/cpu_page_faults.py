"""Why one large batched pass can lose to several small ones on CPU: page faults per call, under glibc's default
allocator settings and with mmap-backed allocations turned off.

glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB) with fresh mmap'd pages and returns them
to the kernel on free, so every call of a pass whose activations exceed it page-faults (and zeroes) them again. The
script runs each case in a fresh child process per allocator setting and reports, per call: wall time, user and
system CPU time, and minor page faults (getrusage).

    python benchmarks/cpu_page_faults.py --out benchmarks/results/cpu_page_faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

ALLOCATORS = {
    "glibc default": {},
    "glibc, mmap off (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=1TiB)": {
        "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1099511627776"},
}


def usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def per_call(fn, calls: int) -> dict[str, float]:
    fn()  # warm-up
    w0, u0, s0, f0 = usage()
    for _ in range(calls):
        fn()
    w1, u1, s1, f1 = usage()
    return {"wall_s": (w1 - w0) / calls, "user_s": (u1 - u0) / calls, "sys_s": (s1 - s0) / calls,
            "minor_faults": (f1 - f0) / calls}


def child(calls: int) -> dict[str, Any]:
    import torch

    import loradrop
    from train_step import Bench

    out: dict[str, Any] = {}
    bench = Bench("minilm", 512, 2, "cpu", torch.float32, "small", False)
    for name, cfg in (("train samples=4 batched (seq 512, batch 2)", {"kind": "loradrop", "samples": 4}),
                      ("train 4 passes + accumulation (seq 512, batch 2)", {"kind": "loradrop", "accum": 4})):
        with bc.configured(bench.model, cfg):
            out[name] = per_call(lambda cfg=cfg, b=bench: b.step(cfg.get("accum", 1)), calls)
    del bench
    base, _ = bc.build_base("minilm", "cpu", torch.float32)
    model = bc.make_peft(base, "minilm").eval()
    inputs = bc.random_batch("minilm", bc.vocab_of(base), 32, 64, "cpu", labels=False)
    with bc.configured(model, {"kind": "loradrop"}):
        out["ensemble N=8 batched (seq 64, batch 32)"] = per_call(
            lambda: loradrop.ensemble_predict(model, inputs, 8, seed=0), calls)
        out["ensemble N=8 sequential (seq 64, batch 32)"] = per_call(
            lambda: loradrop.ensemble_predict(model, inputs, 8, chunk_size=1, seed=0), calls)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3, help="measured calls per case")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.calls)))
        return
    payload = bc.header("cpu_page_faults", "cpu", {"settings": {"calls": args.calls}, "allocators": {}})
    for label, env in ALLOCATORS.items():
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--calls", str(args.calls)],
                              env={**os.environ, **env, "TRANSFORMERS_VERBOSITY": "error"}, capture_output=True,
                              text=True, check=True)
        payload["allocators"][label] = {"env": env, "cases": json.loads(proc.stdout.strip().splitlines()[-1])}
        for case, r in payload["allocators"][label]["cases"].items():
            print(f"{label[:24]:<24} {case:<50} wall {r['wall_s']:6.2f} s  user {r['user_s']:6.2f} s  "
                  f"sys {r['sys_s']:5.2f} s  minor faults {r['minor_faults']:>9,.0f}", flush=True)
    payload["load_avg_at_end"] = list(os.getloadavg())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
