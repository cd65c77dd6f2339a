"""Training-step benchmark (issue #6): time and peak memory of one optimizer step (forward + backward + AdamW) for
plain PEFT LoRA, PEFT's lora_dropout, and loradrop's strategies, scopes and sample counts.

All configurations run on ONE PeftModel that is switched between them (PEFT's dropout module swapped in place,
loradrop applied and removed), so they share weights, inputs and optimizer. Timing rounds are interleaved: every
round runs every configuration back to back, in a rotated order, so drift (thermal, other load) hits all alike.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` around a few steps of
each configuration. On CPU, each configuration runs in a FRESH child process (``subprocess``), which builds the model,
resets its high-water mark (``/proc/self/clear_refs``) and reports ``getrusage(RUSAGE_SELF).ru_maxrss`` over its
steps.

    python benchmarks/train_step.py --device cpu --model minilm --seq-len 128 --batch 8 \
        --out benchmarks/results/train_step_cpu_minilm.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import loradrop  # noqa: E402

CONFIGS: list[dict[str, Any]] = [
    {"name": "peft_lora", "label": "PEFT LoRA, lora_dropout=0 (reference)", "kind": "plain"},
    {"name": "peft_dropout", "label": "PEFT LoRA, lora_dropout=0.1", "kind": "peft_dropout", "p": 0.1},
    {"name": "ab_s1_batch", "label": "loradrop ab, samples=1, batch scope", "kind": "loradrop", "strategy": "ab"},
    {"name": "ab_s1_example", "label": "loradrop ab, samples=1, example scope", "kind": "loradrop",
     "strategy": "ab", "scope": "example"},
    {"name": "ab_s4_batched", "label": "loradrop ab, samples=4 (one batched pass)", "kind": "loradrop",
     "strategy": "ab", "samples": 4},
    {"name": "ab_s4_accum", "label": "loradrop ab, 4 sequential passes + grad accumulation", "kind": "loradrop",
     "strategy": "ab", "accum": 4},
    {"name": "ab_s4_chunk2", "label": "loradrop ab, samples=4 in 2 chunks (member_chunk=2)", "kind": "loradrop",
     "strategy": "ab", "samples": 4, "member_chunk": 2},
    {"name": "a_s1", "label": "loradrop a, samples=1", "kind": "loradrop", "strategy": "a"},
    {"name": "b_s1", "label": "loradrop b, samples=1", "kind": "loradrop", "strategy": "b"},
    {"name": "rank_s1", "label": "loradrop rank, samples=1", "kind": "loradrop", "strategy": "rank"},
    {"name": "input_s1", "label": "loradrop input (element-wise), samples=1", "kind": "loradrop",
     "strategy": "input"},
]
REFERENCE = "peft_lora"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", nargs="+", choices=["minilm", "llama"], default=["minilm"])
    ap.add_argument("--seq-len", nargs="+", type=int, default=[128])
    ap.add_argument("--batch", nargs="+", type=int, default=[8],
                    help="batch size; one value, or one per --seq-len value")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration per round")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before each timed block")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps measured for peak memory")
    ap.add_argument("--mem-repeats", type=int, default=None,
                    help="CPU: fresh child processes per configuration (the smallest peak is reported; default 2)")
    ap.add_argument("--llama-size", choices=sorted(bc.LLAMA_PRESETS), default=None,
                    help="Llama preset (default: small on CPU, base on CUDA)")
    ap.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--minilm-random", action="store_true", help="random-init MiniLM architecture")
    ap.add_argument("--configs", default=None, help="comma-separated subset of configuration names")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--compile", action="store_true",
                    help="run every configuration through torch.compile (inductor); each configuration compiles once "
                         "in the global warm-up")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (fewer steps and rounds)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.quick else (3 if args.device == "cpu" else 10)
    if args.warmup is None:
        args.warmup = 1
    if args.repeats is None:
        args.repeats = 2 if args.quick else (4 if args.device == "cpu" else 5)
    if args.quick:
        args.mem_steps = 1
    if args.mem_repeats is None:
        args.mem_repeats = 1 if args.quick else 2
    if args.llama_size is None:
        args.llama_size = "small" if args.device == "cpu" else "base"
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if len(args.batch) not in (1, len(args.seq_len)):
        ap.error("--batch takes one value or one per --seq-len value")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return args


def selected_configs(names: str | None) -> list[dict[str, Any]]:
    if not names:
        return list(CONFIGS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {c["name"]: c for c in CONFIGS}
    missing = [n for n in wanted if n not in known]
    if missing:
        raise SystemExit(f"unknown configurations {missing}; known: {list(known)}")
    if REFERENCE not in wanted:
        wanted.insert(0, REFERENCE)
    return [known[n] for n in wanted]


class Bench:
    """One model at one (seq_len, batch): the PEFT model, its optimizer, the batch and the step function."""

    def __init__(self, model: str, seq_len: int, batch: int, device: str, dtype: torch.dtype, llama_size: str,
                 minilm_random: bool, compile: bool = False) -> None:
        self.device, self.dtype = device, dtype
        base, self.info = bc.build_base(model, device, dtype, llama_size=llama_size, minilm_random=minilm_random)
        self.model = bc.make_peft(base, model)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.info["trainable_params"] = sum(p.numel() for p in trainable)
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        self.batch = bc.random_batch(model, bc.vocab_of(base), batch, seq_len, device)
        self.forward = self.model
        if compile:
            # One compiled wrapper for all configurations: switching a configuration fails its guards once, and
            # every configuration keeps its own graph in dynamo's cache (the limit is raised to hold them all).
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 256)
            self.forward = torch.compile(self.model)

    def step(self, accum: int = 1) -> float:
        controller = loradrop.model._find_controller(self.model)
        if controller is not None and controller.config.member_chunk:
            with bc.autocast(self.device, self.dtype):
                loss = loradrop.chunked_backward(self.model, self.batch)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return float(loss) if self.device == "cpu" else 0.0
        loss_value = 0.0
        for _ in range(accum):
            with bc.autocast(self.device, self.dtype):
                loss = self.forward(**self.batch).loss
            if accum > 1:
                loss = loss / accum
            loss.backward()
            loss_value += float(loss.detach()) if self.device == "cpu" else 0.0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def run(self, cfg: dict[str, Any], count: int) -> list[float]:
        accum = cfg.get("accum", 1)
        return bc.timed_calls(lambda: self.step(accum), self.device, count)


# ------------------------------------------------------------------------------------------------ memory
def child_main(spec_json: str, out_path: str) -> None:
    """A fresh process: build the model, reset the RSS high-water mark, run a few steps, report the peak RSS."""
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    bench = Bench(spec["model"], spec["seq_len"], spec["batch"], "cpu", bc.parse_dtype(spec["dtype"]),
                  spec["llama_size"], spec["minilm_random"])
    cfg = spec["cfg"]
    with bc.configured(bench.model, cfg):
        bc.cleanup("cpu")
        load_peak = bc.vm_hwm_mib()
        try:  # reset VmHWM (and this process's own ru_maxrss) to the current RSS: the peak below is training's
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            reset = True
        except OSError:
            reset = False
        rss_before = bc.rss_mib()
        parts_before = bc.rss_parts_mib()
        bench.run(cfg, 1)  # warm-up step (allocates the optimizer state)
        times = bench.run(cfg, spec["steps"])
        peak = bc.vm_hwm_mib()
        ru_maxrss = bc.max_rss_mib()
        parts_after = bc.rss_parts_mib()
    result = {"rss_parts_before_mib": parts_before, "rss_parts_after_mib": parts_after,
              "peak_rss_mib": peak, "rss_before_steps_mib": rss_before, "step_mib": peak - rss_before,
              "load_peak_rss_mib": load_peak, "ru_maxrss_mib": ru_maxrss, "hwm_reset": reset, "step_times_s": times,
              "method": "fresh child process per configuration; peak RSS (VmHWM, the address space's part of "
                        "getrusage ru_maxrss, which Linux otherwise inherits from the parent) reset after the model "
                        "build, over one warm-up and the measured steps; step_mib = peak - RSS after the model build"}
    Path(out_path).write_text(json.dumps(result))


def cpu_memory(args: argparse.Namespace, model: str, seq_len: int, batch: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the configuration in `args.mem_repeats` fresh child processes; keep the one with the smallest peak (RSS
    peaks carry allocator noise of a few MiB upwards, never downwards)."""
    spec = {"model": model, "seq_len": seq_len, "batch": batch, "dtype": args.dtype, "llama_size": args.llama_size,
            "minilm_random": args.minilm_random, "cfg": cfg, "steps": args.mem_steps, "threads": args.threads}
    results = []
    for _ in range(args.mem_repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "mem.json"
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec),
                                   "--child-out", str(out)], capture_output=True, text=True)
            if proc.returncode != 0 or not out.is_file():
                return {"error": (proc.stderr or proc.stdout)[-2000:]}
            results.append(json.loads(out.read_text()))
    best = dict(min(results, key=lambda r: r["peak_rss_mib"]))
    best["all_peak_rss_mib"] = [r["peak_rss_mib"] for r in results]
    best["all_step_mib"] = [r["step_mib"] for r in results]
    return best


def cuda_memory(bench: Bench, cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    with bc.configured(bench.model, cfg):
        bench.run(cfg, 1)  # shapes and allocator state of this configuration
        bc.cleanup("cuda")
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        bench.run(cfg, steps)
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    return {"peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20, "allocated_before_mib": before / 2**20,
            "peak_reserved_mib": reserved / 2**20,
            "method": "torch.cuda.max_memory_allocated after reset_peak_memory_stats (weights, optimizer state, "
                      "activations); step_mib = peak - allocated before the steps"}


# ------------------------------------------------------------------------------------------------ main
def bench_one(args: argparse.Namespace, model: str, seq_len: int, batch: int,
              configs: list[dict[str, Any]]) -> dict[str, Any]:
    device, dtype = args.device, bc.parse_dtype(args.dtype)
    print(f"== {model} seq_len={seq_len} batch={batch} ({device}, {args.dtype})", flush=True)
    bench = Bench(model, seq_len, batch, device, dtype, args.llama_size, args.minilm_random, args.compile)
    # global warm-up: every configuration once (kernels, allocator, optimizer state)
    for cfg in configs:
        with bc.configured(bench.model, cfg):
            bench.run(cfg, args.warmup)
    per_round: dict[str, list[list[float]]] = {c["name"]: [] for c in configs}
    for r in range(args.repeats):
        for cfg in bc.rotated(configs, r):
            with bc.configured(bench.model, cfg):
                if args.warmup:
                    bench.run(cfg, args.warmup)
                per_round[cfg["name"]].append(bench.run(cfg, args.steps))
        line = "  ".join(f"{c['name']}={1e3 * sorted(per_round[c['name']][-1])[len(per_round[c['name']][-1]) // 2]:.0f}"
                         for c in configs)
        print(f"  round {r + 1}/{args.repeats} ms/step: {line}", flush=True)

    memory: dict[str, dict[str, Any]] = {}
    if not args.no_memory:
        for cfg in configs:
            if device == "cuda":
                memory[cfg["name"]] = cuda_memory(bench, cfg, args.mem_steps)
            else:
                memory[cfg["name"]] = cpu_memory(args, model, seq_len, batch, cfg)
            mem = memory[cfg["name"]]
            print(f"  memory {cfg['name']}: " + (f"peak {mem.get('peak_mib', mem.get('peak_rss_mib', 0)):.0f} MiB, "
                                                 f"step {mem.get('step_mib', 0):.0f} MiB" if "error" not in mem
                                                 else "ERROR " + mem["error"][-300:]), flush=True)

    ref_rounds = [sorted(ts)[len(ts) // 2] for ts in per_round[REFERENCE]]
    ref_all = bc.summary([t for ts in per_round[REFERENCE] for t in ts])
    ref_mem = memory.get(REFERENCE, {})
    rows = []
    for cfg in configs:
        flat = [t for ts in per_round[cfg["name"]] for t in ts]
        stats = bc.summary(flat)
        rounds = [sorted(ts)[len(ts) // 2] for ts in per_round[cfg["name"]]]
        row: dict[str, Any] = {
            "name": cfg["name"], "label": cfg["label"], "config": {k: v for k, v in cfg.items() if k != "label"},
            "time_s": stats, "ratio_vs_plain": stats["median"] / ref_all["median"],
            "ratio_per_round": bc.ratio_stats([a / b for a, b in zip(rounds, ref_rounds)]),
            "times_s": per_round[cfg["name"]],
        }
        mem = memory.get(cfg["name"])
        if mem is not None:
            row["memory"] = mem
            peak_key = "peak_mib" if device == "cuda" else "peak_rss_mib"
            if "error" not in mem and "error" not in ref_mem and ref_mem:
                row["memory_ratio_vs_plain"] = mem[peak_key] / ref_mem[peak_key]
                if ref_mem["step_mib"] > 0:
                    row["step_memory_ratio_vs_plain"] = mem["step_mib"] / ref_mem["step_mib"]
        rows.append(row)
        print(f"  {cfg['name']:<14} median {1e3 * stats['median']:8.1f} ms  IQR {1e3 * stats['iqr']:6.1f} ms  "
              f"x{row['ratio_vs_plain']:.3f}  mem x{row.get('memory_ratio_vs_plain', float('nan')):.3f} "
              f"(step x{row.get('step_memory_ratio_vs_plain', float('nan')):.3f})", flush=True)
    result = {"model": model, "model_info": bench.info, "seq_len": seq_len, "batch": batch, "configs": rows}
    del bench
    bc.cleanup(device)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.child_out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = selected_configs(args.configs)
    settings = {"device": args.device, "dtype": args.dtype, "autocast": args.device == "cuda" and
                args.dtype in ("bfloat16", "bf16", "float16", "fp16"), "steps": args.steps, "warmup": args.warmup,
                "repeats": args.repeats, "mem_steps": args.mem_steps,
                "mem_repeats": args.mem_repeats if args.device == "cpu" else None, "llama_size": args.llama_size,
                "lora": {"r": bc.LORA_R, "alpha": bc.LORA_ALPHA, "targets": bc.LORA_TARGETS},
                "loradrop_p": 0.5, "optimizer": "torch.optim.AdamW(lr=1e-4) on the LoRA (+ head) parameters",
                "quick": args.quick, "compile": "torch.compile (inductor, default mode)" if args.compile else None}
    payload = bc.header("train_step", args.device, {"settings": settings, "runs": []})
    batches = args.batch if len(args.batch) == len(args.seq_len) else args.batch * len(args.seq_len)
    for model in args.model:
        for seq_len, batch in zip(args.seq_len, batches):
            payload["runs"].append(bench_one(args, model, seq_len, batch, configs))
            if args.out:  # keep partial results if a later run fails
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
            payload["load_avg_at_end"] = list(__import__("os").getloadavg())
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
