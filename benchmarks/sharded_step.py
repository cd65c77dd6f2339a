"""Training step time and peak memory per GPU under sharding (FSDP2 / ZeRO-3 / DDP through accelerate): plain LoRA
against LoRA Dropout (samples=1 and samples=4), on a random-initialised Llama-style model.

Run it through ``accelerate launch`` with one of the committed configs (docs/SCALING.md):

    accelerate launch --config_file configs/accelerate/fsdp2.yaml benchmarks/sharded_step.py \
        --preset 3b --seq-len 4096 --batch 2 --out benchmarks/results/sharded_step_fsdp2.json

and the tiny CPU setting (gloo; what tests/test_distributed_bench.py runs):

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no \
        benchmarks/sharded_step.py --preset tiny --seq-len 16 --batch 2 --steps 2 --warmup 1 --out out.json

accelerate 1.15 runs FSDP only on accelerators (on CPU its state becomes MULTI_CPU, i.e. DDP over gloo), so on CPU
with an FSDP config this script applies ``fully_shard`` itself, with the same wrapping as the config (every decoder
layer, then the root), and says so in the JSON (``"sharding"``).

Every configuration builds a fresh model (same seed), prepares it with the accelerator, runs `--warmup` untimed and
`--steps` timed optimizer steps (forward, backward, AdamW step) and records each rank's step times and peak memory
(CUDA: ``max_memory_allocated`` / ``max_memory_reserved`` since the configuration started; CPU: the process's peak
RSS so far, which never decreases, so only the first configuration's CPU number is its own). Rank 0 writes one JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "src" / "loradrop").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # a source checkout that is not pip-installed still runs

import loradrop  # noqa: E402

# Llama-style decoders (random weights; step time and memory do not depend on the values).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),  # TinyLlama-1.1B's shape
    "3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=32000),  # Llama-3.2-3B's shape with a 32k vocabulary
}
CONFIGS: dict[str, dict[str, Any] | None] = {  # name -> LoraDropoutConfig settings, None: plain PEFT LoRA
    "lora": None,
    "loradrop_s1": dict(p=0.5, samples=1),
    "loradrop_s4": dict(p=0.5, samples=4),
    "loradrop_s4_chunk1": dict(p=0.5, samples=4, member_chunk=1),  # one member's activations at a time
    "loradrop_example": dict(p=0.5, mask_scope="example"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def version(name: str) -> str | None:
    try:
        return pkg_version(name)
    except PackageNotFoundError:
        return getattr(sys.modules.get(name), "__version__", None)


def build(preset: str, settings: dict[str, Any] | None, dtype: torch.dtype, device: torch.device, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=8192, **PRESETS[preset])
    with device:
        base = LlamaForCausalLM(config).to(dtype)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    if settings is not None:
        # seed=None: each rank draws its own; loradrop broadcasts rank 0's stream at the first step (SCALING.md)
        torch.manual_seed(rank)
        loradrop.apply_lora_dropout(model, loradrop.LoraDropoutConfig(**settings))
    return model, sum(p.numel() for p in base.parameters())


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def manual_fsdp(accelerator) -> bool:
    """An FSDP config on CPU processes, which accelerate runs as DDP: shard with fully_shard here instead."""
    return (accelerator.device.type == "cpu" and accelerator.num_processes > 1
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def deepspeed_chunked_step(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimizer step of a DeepSpeed engine (gradient_accumulation_steps 1) whose ``samples=N`` run in member
    chunks: what `loradrop.chunked_backward` does, with DeepSpeed's ``engine.backward`` (its loss scaling and ZeRO
    gradient reduction) per chunk, only the last chunk marked as the accumulation boundary (DeepSpeed's documented
    pattern for several backward passes per step), then ``engine.step()``. accelerate's ``backward`` cannot be used
    here: under DeepSpeed it steps the engine after every call. Returns the step's loss (the chunks' weighted sum)."""
    if engine.gradient_accumulation_steps() != 1:
        raise ValueError(f"member chunks under DeepSpeed expect gradient_accumulation_steps 1, got "
                         f"{engine.gradient_accumulation_steps()}")
    controller = loradrop.get_controller(engine)
    samples, last = controller.config.samples, len(controller.config.chunks) - 1
    total = None
    for index, (_, size) in enumerate(controller.member_chunks()):
        loss = engine(**batch).loss * (size / samples)
        engine.set_gradient_accumulation_boundary(index == last)
        engine.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    engine.step()
    return total


def run_config(accelerator, name: str, args: argparse.Namespace) -> dict[str, Any]:
    device = accelerator.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, n_params = build(args.preset, CONFIGS[name], dtype, device, accelerator.process_index)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None:  # no data loader is prepared: DeepSpeed needs the micro batch size spelled out
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch
    if manual_fsdp(accelerator):
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(1000 + accelerator.process_index)
    chunked = bool(CONFIGS[name] and CONFIGS[name].get("member_chunk"))
    vocab = PRESETS[args.preset]["vocab_size"]
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if chunked and deepspeed is not None:  # engine.backward per chunk, then the engine's one step
            loss = deepspeed_chunked_step(model, {"input_ids": ids, "labels": ids})
        elif chunked:  # loradrop.chunked_backward: forward + backward per member chunk, the step's mean loss
            loss = loradrop.chunked_backward(model, {"input_ids": ids, "labels": ids})
        else:
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach().float()))
    controller = loradrop.get_controller(accelerator.unwrap_model(model)) if CONFIGS[name] else None
    result = {
        "rank": accelerator.process_index,
        "step_s": times,
        "median_step_s": statistics.median(times),
        "loss": losses,
        "memory": peak_memory(device),
        "mask_seed": controller.seed if controller else None,
        "mask_step": controller.step if controller else None,
    }
    del model, optimizer
    accelerator.free_memory()
    gc.collect()
    return {"n_params": n_params, "rank_result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="3b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", default="lora,loradrop_s1,loradrop_s4",
                        help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="model weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (non-reentrant)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {sorted(CONFIGS)}")

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU: several processes over gloo
    if args.dtype is None:
        args.dtype = "bf16" if accelerator.device.type == "cuda" else "fp32"
    results = []
    for name in names:
        try:
            out = run_config(accelerator, name, args)
        except torch.OutOfMemoryError as error:  # every rank runs the same shapes, so all of them get here
            accelerator.free_memory()
            gc.collect()
            torch.cuda.empty_cache()
            out = {"n_params": None, "rank_result": {"rank": accelerator.process_index, "oom": str(error)[:300],
                                                     "median_step_s": float("nan"), "memory": peak_memory(
                                                         accelerator.device)}}
        gathered: list[Any] = [None] * accelerator.num_processes
        if accelerator.num_processes > 1:
            torch.distributed.all_gather_object(gathered, out["rank_result"])
        else:
            gathered = [out["rank_result"]]
        results.append({"name": name, "loradrop": CONFIGS[name], "n_params": out["n_params"], "ranks": gathered,
                        "median_step_s_max_over_ranks": max(r["median_step_s"] for r in gathered)})
        accelerator.print(f"{name}: median step {results[-1]['median_step_s_max_over_ranks']:.4f} s, "
                          f"memory {gathered[0]['memory']}")
    if not accelerator.is_main_process:  # both ranks leave together: one rank destroying the gloo group while the
        accelerator.wait_for_everyone()  # other still writes sometimes aborted it (SIGABRT, "terminate called ...")
        accelerator.end_training()
        return
    base = next((r for r in results if r["name"] == "lora"), None)
    for r in results:
        if base is not None:
            r["step_time_vs_lora"] = r["median_step_s_max_over_ranks"] / base["median_step_s_max_over_ranks"]
    state = accelerator.state
    fsdp = getattr(state, "fsdp_plugin", None)
    payload = {
        "benchmark": "sharded_step",
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "accelerate_config_file": os.environ.get("ACCELERATE_CONFIG_FILE"),
        "distributed_type": str(state.distributed_type),
        "fsdp_version": getattr(fsdp, "fsdp_version", None),
        "sharding": ("fully_shard applied by the script (accelerate runs FSDP only on accelerators)"
                     if manual_fsdp(accelerator) else "accelerate"),
        "deepspeed_zero_stage": getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None),
        "mixed_precision": str(state.mixed_precision),
        "world_size": accelerator.num_processes,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"preset": args.preset, **PRESETS[args.preset], "lora_r": 16, "targets": TARGETS},
        "versions": {n: version(n) for n in ("torch", "transformers", "accelerate", "peft", "loradrop",
                                             "deepspeed")},
        "hardware": {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
                     "cuda": torch.version.cuda},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    accelerator.print(f"wrote {args.out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: left to interpreter shutdown, gloo can abort the exit


if __name__ == "__main__":
    main()
