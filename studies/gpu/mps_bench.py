"""How much K training processes sharing one GPU get done together: the study's workload in miniature (SmolLM2 with
LoRA r=8 on q/k/v/o, eager attention, bf16 autocast, a cloze-sized batch of 64 rows x 48 tokens), K processes at
once, each counting its optimizer steps for SECONDS after a warm-up, started together at a barrier.

Run once without and once with a CUDA MPS daemon (studies/gpu/call.sh does both when MPS_BENCH=1), it says whether
MPS (the processes' kernels side by side) beats the GPU's time slicing (the processes in turns) for the sweeps' runs:

    python studies/gpu/mps_bench.py --model /tmp/gpu/smol --procs 12 --seconds 20 --label no_mps --out bench.jsonl

Appends one JSON line: label, procs, seconds, steps per process, total steps/s, GPU name, torch version, and whether
the processes were pointed at an MPS daemon (CUDA_MPS_PIPE_DIRECTORY).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path


def _worker(model_dir: str, seconds: float, barrier, results, index: int, device: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(index)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (64, 48), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: kernels chosen, allocator filled
        step()
    sync()
    barrier.wait(timeout=120)  # a worker that failed to load must not leave the others waiting on the GPU
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    sync()
    results[index] = steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local SmolLM2 folder (safetensors)")
    parser.add_argument("--procs", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", required=True, help="JSON lines file to append to")
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of the script only)")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(args.procs)
    results = ctx.Array("d", args.procs)
    procs = [ctx.Process(target=_worker, args=(args.model, args.seconds, barrier, results, i, args.device), daemon=True)
             for i in range(args.procs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    import torch

    rates = list(results)
    record = {"label": args.label, "procs": args.procs, "seconds": args.seconds,
              "steps_per_s_per_proc": [round(r, 3) for r in rates], "total_steps_per_s": round(sum(rates), 3),
              "all_ok": all(p.exitcode == 0 for p in procs) and all(r > 0 for r in rates),
              "cuda_mps": "CUDA_MPS_PIPE_DIRECTORY" in os.environ,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}
    with Path(args.out).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
