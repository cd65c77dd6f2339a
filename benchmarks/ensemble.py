"""Test-time ensemble benchmark: latency and throughput of loradrop's batched ensemble against N sequential passes and
against PEFT "MC dropout", for a classifier (MiniLM) and for generation (a Llama-style random-initialised decoder).

Classifier, for every batch size and ensemble size N (all on one PEFT LoRA model, switched between states):

- ``single``: one plain PEFT LoRA forward in eval mode (the single-model reference),
- ``batched``: ``loradrop.ensemble_predict(model, batch, N)`` (N members in one forward on the batch repeated N times),
- ``sequential``: ``ensemble_predict(..., chunk_size=1)``: the same N members as N sequential forwards,
- ``mc_dropout``: PEFT with ``lora_dropout=0.1`` left in train mode (``model.train()``, so the base model's own
  dropout is on too, as MC dropout is used in practice), N forwards under ``torch.no_grad``, softmax averaged.

Generation (greedy, KV cache, no early stop), per-token latency:

- ``hf_generate``: plain PEFT model, ``model.generate(do_sample=False, min_new_tokens=T)`` (single model),
- ``greedy_loop``: plain PEFT model, a hand-written greedy loop with KV cache (what ensemble_generate does for one),
- ``ensemble``: ``loradrop.ensemble_generate(model, ids, N, T, eos_token_id=[])`` (one batched KV cache, N*B rows),
- ``sequential_members``: the same N members, each with its own KV cache, run one after the other every step.

Decode latency per token = (time for T new tokens - time for 1 new token) / (T - 1); the prompt's prefill is
reported separately (the time for 1 new token).

    python benchmarks/ensemble.py --device cpu --out benchmarks/results/ensemble_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import loradrop  # noqa: E402

LORADROP = {"kind": "loradrop", "strategy": "ab", "p": 0.5}
PLAIN = {"kind": "plain"}
MC = {"kind": "peft_dropout", "p": bc.PEFT_DROPOUT}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--task", nargs="+", choices=["classifier", "generation"], default=["classifier", "generation"])
    ap.add_argument("--n", nargs="+", type=int, default=None, help="ensemble sizes (default 1 2 4 8 16)")
    ap.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 32)")
    ap.add_argument("--gen-batch", nargs="+", type=int, default=None, help="generation batch sizes (default: --batch)")
    ap.add_argument("--seq-members-n", nargs="+", type=int, default=None,
                    help="N for the sequential-members generation baseline (default 2 4 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="classifier sequence length (default 64 CPU, 128 GPU)")
    ap.add_argument("--prompt-len", type=int, default=None, help="generation prompt length (default 32 CPU, 128 GPU)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 16 CPU, 32 GPU)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    ap.add_argument("--cell-seconds", type=float, default=None, help="time budget of one cell in one round")
    ap.add_argument("--max-iters", type=int, default=None, help="most timed calls of one cell in one round")
    ap.add_argument("--llama-size", choices=sorted(bc.LLAMA_PRESETS), default=None)
    ap.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--minilm-random", action="store_true", help="random-init MiniLM architecture")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if args.n is None:
        args.n = [1, 4, 8] if args.quick else [1, 2, 4, 8, 16]
    if args.batch is None:
        args.batch = [1, 8] if args.quick else [1, 32]
    if args.gen_batch is None:
        # CPU: batch 1 only by default (a batch of 32 x 16 members is minutes per call on 2 cores)
        args.gen_batch = [1] if (args.quick or cpu) else list(args.batch)
    if args.seq_members_n is None:
        args.seq_members_n = [4] if args.quick else [2, 4, 8]
    args.seq_len = args.seq_len or (64 if cpu else 128)
    args.prompt_len = args.prompt_len or (32 if cpu else 128)
    args.new_tokens = args.new_tokens or (8 if args.quick else (16 if cpu else 32))
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.cell_seconds = args.cell_seconds or (0.3 if args.quick else (1.0 if cpu else 0.3))
    args.max_iters = args.max_iters or (10 if cpu else 30)
    args.llama_size = args.llama_size or ("small" if cpu else "base")
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode latency is measured from T and 1 new tokens)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return args


def measure(fn: Callable[[], Any], device: str, budget_s: float, max_iters: int,
            estimate: float | None = None) -> list[float]:
    """One untimed warm-up call, then as many timed calls as fit in `budget_s` (1 to `max_iters`).

    The warm-up comes every round: the first call after switching cells runs on an allocator (glibc on CPU, the
    caching allocator on CUDA) shaped by the previous cell, and is slower for the cell with the larger tensors.
    `estimate` (the fastest call of earlier rounds) sets the count; without one the warm-up call does.
    """
    with bc.Timer(device) as t:
        fn()
    estimate = t.seconds if estimate is None else estimate
    iters = max(1, min(max_iters, math.floor(budget_s / max(estimate, 1e-6))))
    return bc.timed_calls(fn, device, iters)


def peak_memory(fn: Callable[[], Any], device: str) -> float | None:
    if device != "cuda":
        return None
    bc.cleanup(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


# ------------------------------------------------------------------------------------------------ classifier
def classifier_cells(model: torch.nn.Module, inputs_by_batch: dict[int, dict[str, torch.Tensor]],
                     ns: list[int]) -> list[dict[str, Any]]:
    cells = []
    for batch, inputs in inputs_by_batch.items():
        def single(inputs=inputs):
            with torch.no_grad():
                return model(**inputs).logits.float().softmax(-1)

        cells.append({"method": "single", "batch": batch, "n": 1, "state": PLAIN, "train": False, "fn": single})
        for n in ns:
            def batched(inputs=inputs, n=n):
                return loradrop.ensemble_predict(model, inputs, n, seed=0)

            def sequential(inputs=inputs, n=n):
                return loradrop.ensemble_predict(model, inputs, n, chunk_size=1, seed=0)

            def mc_dropout(inputs=inputs, n=n):
                with torch.no_grad():
                    probs = model(**inputs).logits.float().softmax(-1)
                    for _ in range(n - 1):
                        probs = probs + model(**inputs).logits.float().softmax(-1)
                return probs / n

            cells.append({"method": "batched", "batch": batch, "n": n, "state": LORADROP, "train": False,
                          "fn": batched})
            cells.append({"method": "sequential", "batch": batch, "n": n, "state": LORADROP, "train": False,
                          "fn": sequential})
            cells.append({"method": "mc_dropout", "batch": batch, "n": n, "state": MC, "train": True,
                          "fn": mc_dropout})
    return cells


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def greedy_loop(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Single-model greedy decoding with a KV cache: one prefill and new_tokens - 1 decode forwards."""
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    chosen = []
    for step in range(new_tokens):
        tok = out.logits[:, -1, :].argmax(-1)
        chosen.append(tok)
        if step == new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=position_ids,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(chosen, 1)


@torch.no_grad()
def sequential_members(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int,
                       new_tokens: int) -> torch.Tensor:
    """The n ensemble members one after the other, each with its own KV cache; probabilities averaged per step."""
    ctl = loradrop.get_controller(model)
    key = ctl.ensemble_key(0)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    outs = []
    for m in range(n):
        with ctl.ensemble(key, 1, m):
            outs.append(model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                              logits_to_keep=1))
    chosen = []
    for step in range(new_tokens):
        probs = torch.stack([o.logits[:, -1, :].float().softmax(-1) for o in outs]).mean(0)
        tok = probs.argmax(-1)
        chosen.append(tok)
        if step == new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        for m in range(n):
            with ctl.ensemble(key, 1, m):
                outs[m] = model(input_ids=tok[:, None], attention_mask=mask, position_ids=position_ids,
                                past_key_values=outs[m].past_key_values, use_cache=True)
    return torch.stack(chosen, 1)


def generation_cells(model: torch.nn.Module, prompts: dict[int, dict[str, torch.Tensor]], ns: list[int],
                     seq_ns: list[int], new_tokens: int) -> list[dict[str, Any]]:
    cells = []
    for batch, p in prompts.items():
        ids, mask = p["input_ids"], p["attention_mask"]

        def hf(tokens, ids=ids, mask=mask):
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, pad_token_id=0, use_cache=True)

        def loop(tokens, ids=ids, mask=mask):
            return greedy_loop(model, ids, mask, tokens)

        cells.append({"method": "hf_generate", "batch": batch, "n": 1, "state": PLAIN, "train": False, "fn": hf})
        cells.append({"method": "greedy_loop", "batch": batch, "n": 1, "state": PLAIN, "train": False, "fn": loop})
        for n in ns:
            def ens(tokens, ids=ids, mask=mask, n=n):
                return loradrop.ensemble_generate(model, ids, n, tokens, attention_mask=mask, eos_token_id=[],
                                                  seed=0)

            cells.append({"method": "ensemble", "batch": batch, "n": n, "state": LORADROP, "train": False,
                          "fn": ens})
        for n in seq_ns:
            def seq(tokens, ids=ids, mask=mask, n=n):
                return sequential_members(model, ids, mask, n, tokens)

            cells.append({"method": "sequential_members", "batch": batch, "n": n, "state": LORADROP,
                          "train": False, "fn": seq})
    return cells


# ------------------------------------------------------------------------------------------------ runner
def run_cells(model: torch.nn.Module, cells: list[dict[str, Any]], args: argparse.Namespace, *,
              generation: bool) -> list[dict[str, Any]]:
    device = args.device
    times: dict[int, dict[str, list[float]]] = {i: {"full": [], "first": []} for i in range(len(cells))}
    memory: dict[int, float | None] = {}
    indexed = list(enumerate(cells))
    for r in range(args.repeats):
        for i, cell in bc.rotated(indexed, r):
            # iteration counts from the fastest call so far: a burst of outside load must not starve later rounds
            est_full = min(times[i]["full"]) if times[i]["full"] else None
            est_first = min(times[i]["first"]) if times[i]["first"] else None
            with bc.configured(model, cell["state"]):
                model.train(cell["train"])
                if generation:
                    t_full = args.new_tokens
                    times[i]["full"] += measure(lambda c=cell, t=t_full: c["fn"](t), device, args.cell_seconds,
                                                args.max_iters, est_full)
                    times[i]["first"] += measure(lambda c=cell: c["fn"](1), device, args.cell_seconds / 2,
                                                 args.max_iters, est_first)
                    if r == 0:
                        memory[i] = peak_memory(lambda c=cell, t=t_full: c["fn"](t), device)
                else:
                    times[i]["full"] += measure(cell["fn"], device, args.cell_seconds, args.max_iters, est_full)
                    if r == 0:
                        memory[i] = peak_memory(cell["fn"], device)
                model.eval()
        print(f"  round {r + 1}/{args.repeats} done", flush=True)

    rows = []
    for i, cell in indexed:
        full = bc.summary(times[i]["full"])
        row: dict[str, Any] = {"method": cell["method"], "batch": cell["batch"], "n": cell["n"], "latency_s": full,
                               "throughput_examples_per_s": cell["batch"] / full["median"],
                               "peak_memory_mib": memory.get(i)}
        if generation:
            first = bc.summary(times[i]["first"])
            t = args.new_tokens
            row["first_token_s"] = first
            row["decode_per_token_s"] = (full["median"] - first["median"]) / (t - 1)
            row["per_token_incl_prefill_s"] = full["median"] / t
            row["tokens_per_s"] = cell["batch"] * t / full["median"]
        rows.append(row)
    # ratios against the single-model reference of the same batch
    for row in rows:
        if generation:
            refs = {m: next(x for x in rows if x["method"] == m and x["batch"] == row["batch"])
                    for m in ("hf_generate", "greedy_loop")}
            best = min(refs.values(), key=lambda x: x["decode_per_token_s"])
            row["decode_ratio_vs_best_single"] = row["decode_per_token_s"] / best["decode_per_token_s"]
            row["decode_ratio_vs_hf_generate"] = row["decode_per_token_s"] / refs["hf_generate"]["decode_per_token_s"]
            loop_median = refs["greedy_loop"]["latency_s"]["median"]
            row["latency_ratio_vs_greedy_loop"] = row["latency_s"]["median"] / loop_median
        else:
            ref = next(x for x in rows if x["method"] == "single" and x["batch"] == row["batch"])
            row["ratio_vs_single"] = row["latency_s"]["median"] / ref["latency_s"]["median"]
            if row["method"] in ("batched", "mc_dropout"):
                seq = next((x for x in rows if x["method"] == "sequential" and x["batch"] == row["batch"]
                            and x["n"] == row["n"]), None)
                if seq is not None:
                    row["ratio_vs_sequential"] = row["latency_s"]["median"] / seq["latency_s"]["median"]
    for row in rows:
        if generation:
            print(f"  {row['method']:<19} B={row['batch']:<3} N={row['n']:<3} "
                  f"total {1e3 * row['latency_s']['median']:9.1f} ms  "
                  f"decode {1e3 * row['decode_per_token_s']:8.2f} ms/tok  "
                  f"x{row['decode_ratio_vs_best_single']:.2f} vs best single", flush=True)
        else:
            print(f"  {row['method']:<11} B={row['batch']:<3} N={row['n']:<3} "
                  f"{1e3 * row['latency_s']['median']:9.2f} ms  x{row['ratio_vs_single']:.2f} vs single"
                  + (f"  x{row['ratio_vs_sequential']:.2f} vs sequential" if "ratio_vs_sequential" in row else ""),
                  flush=True)
    return rows


def bench_classifier(args: argparse.Namespace) -> dict[str, Any]:
    dtype = bc.parse_dtype(args.dtype)
    print(f"== classifier (minilm) seq_len={args.seq_len} ({args.device}, {args.dtype})", flush=True)
    base, info = bc.build_base("minilm", args.device, dtype, minilm_random=args.minilm_random)
    model = bc.make_peft(base, "minilm").eval()
    inputs = {b: {k: v for k, v in bc.random_batch("minilm", bc.vocab_of(base), b, args.seq_len, args.device,
                                                   labels=False).items()} for b in args.batch}
    rows = run_cells(model, classifier_cells(model, inputs, args.n), args, generation=False)
    del model, base
    bc.cleanup(args.device)
    return {"model_info": info, "seq_len": args.seq_len, "rows": rows}


def bench_generation(args: argparse.Namespace) -> dict[str, Any]:
    dtype = bc.parse_dtype(args.dtype)
    print(f"== generation (llama {args.llama_size}) prompt={args.prompt_len} new={args.new_tokens} "
          f"({args.device}, {args.dtype})", flush=True)
    base, info = bc.build_base("llama", args.device, dtype, llama_size=args.llama_size)
    base.generation_config.eos_token_id = None  # never stop early: every method generates exactly T tokens
    model = bc.make_peft(base, "llama").eval()
    prompts = {b: bc.random_batch("llama", bc.vocab_of(base), b, args.prompt_len, args.device, labels=False, seed=b)
               for b in args.gen_batch}
    cells = generation_cells(model, prompts, args.n, args.seq_members_n, args.new_tokens)
    rows = run_cells(model, cells, args, generation=True)
    del model, base
    bc.cleanup(args.device)
    return {"model_info": info, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {k: getattr(args, k) for k in ("device", "dtype", "n", "batch", "gen_batch", "seq_members_n",
                                               "seq_len", "prompt_len", "new_tokens", "repeats", "cell_seconds",
                                               "max_iters", "llama_size", "quick")}
    settings.update({"loradrop": {"p": 0.5, "strategy": "ab"}, "mc_dropout_p": bc.PEFT_DROPOUT,
                     "lora": {"r": bc.LORA_R, "alpha": bc.LORA_ALPHA, "targets": bc.LORA_TARGETS},
                     "autocast": args.device == "cuda" and args.dtype != "float32"})
    payload = bc.header("ensemble", args.device, {"settings": settings})

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")

    with bc.autocast(args.device, bc.parse_dtype(args.dtype)):
        if "classifier" in args.task:
            payload["classifier"] = bench_classifier(args)
            save()
        if "generation" in args.task:
            payload["generation"] = bench_generation(args)
    payload["load_avg_at_end"] = list(os.getloadavg())
    save()
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
