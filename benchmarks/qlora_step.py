"""QLoRA training-step cost of LoRA Dropout (issue #13): plain QLoRA vs PEFT lora_dropout vs LoRA Dropout.

A Llama-style model with random weights (no download) is written once as safetensors and loaded back through
transformers with ``BitsAndBytesConfig(load_in_4bit=True, nf4, bfloat16 compute)``, the way QLoRA loads a real
model; ``prepare_model_for_kbit_training``; LoRA r=16 on q/k/v/o/gate/up/down. For each variant a fresh model is
loaded and trained with AdamW on a fixed random batch; the step time is the median over ``--steps`` steps after
``--warmup`` (``torch.cuda.synchronize`` around each), the peak memory is ``torch.cuda.max_memory_allocated`` over
the measured steps. Before timing, p = 0 parity is checked on the device: the loss and every LoRA gradient of plain
PEFT QLoRA and of the same model with ``apply_lora_dropout(p=0)`` must be bit-identical.

Variants: ``qlora`` (lora_dropout=0), ``qlora_peft_dropout`` (PEFT's lora_dropout=0.1), ``ld_s1`` / ``ld_s4``
(LoRA Dropout p=0.1, samples=1 / 4; PEFT's lora_dropout=0).

GPU (a machine with torch, transformers and accelerate, but without peft and bitsandbytes): build the side folder
here, carry it (8 MB with one CUDA library), run from the repository root there:

    benchmarks/qlora_gpu_site.sh 130   # 130 = torch.version.cuda 13.0 on the GPU machine; 128 for 12.8, ...
    PYTHONPATH=src:benchmarks/runs/qlora_site python benchmarks/qlora_step.py --out $OUT/qlora_step_cuda.json

Tiny CPU check (bitsandbytes' CPU backend; tests/test_qlora_benchmark.py runs it with fewer variants):

    python benchmarks/qlora_step.py --device cpu --hidden 64 --intermediate 128 --layers 2 --heads 2 --seq 16 \\
        --batch 2 --vocab 128 --warmup 1 --steps 2 --out /tmp/qlora_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

VARIANTS = ("qlora", "qlora_peft_dropout", "ld_s1", "ld_s4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.1, help="LoRA Dropout p and PEFT lora_dropout")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-autocast", action="store_true", help="no bf16 autocast (the adapter stays float32)")
    return parser.parse_args(argv)


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_base(args: argparse.Namespace, folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)  # safetensors


def load_qlora(args: argparse.Namespace, folder: Path, peft_dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": args.device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    torch.manual_seed(1)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=peft_dropout, target_modules=TARGETS,
                        init_lora_weights=False, task_type="CAUSAL_LM")  # B != 0, so the masks change the loss
    return get_peft_model(model, config)


def batch(args: argparse.Namespace):
    import torch

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    return {"input_ids": ids, "labels": ids}


def autocast(args: argparse.Namespace):
    import torch

    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=not args.no_autocast)


def sync(args: argparse.Namespace) -> None:
    import torch

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def loss_and_grads(model, args: argparse.Namespace, inputs: dict):
    model.zero_grad(set_to_none=True)
    with autocast(args):
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def check_parity(args: argparse.Namespace, folder: Path) -> dict:
    """Plain PEFT QLoRA vs the same model with LoRA Dropout at p=0: loss and gradients, bit for bit."""
    import torch

    import loradrop

    model = load_qlora(args, folder, 0.0)
    model.train()
    inputs = batch(args)
    loss_ref, grads_ref = loss_and_grads(model, args, inputs)
    loradrop.apply_lora_dropout(model, loradrop.LoraDropoutConfig(p=0.0, seed=0))
    adapted = sum(type(m.lora_variant.get("default")).__name__ == "LoraDropoutBnbVariant"
                  for m in model.modules() if hasattr(m, "lora_variant"))
    loss_ld, grads_ld = loss_and_grads(model, args, inputs)
    model.eval()
    with torch.no_grad(), autocast(args):
        logits_ld = model(input_ids=inputs["input_ids"][:1]).logits
        loradrop.remove_lora_dropout(model)
        logits_ref = model(input_ids=inputs["input_ids"][:1]).logits
    different = [n for n in grads_ref if not torch.equal(grads_ref[n], grads_ld[n])]
    result = {"bnb_layers_adapted": adapted, "loss_equal": bool(torch.equal(loss_ref, loss_ld)),
              "grads_equal": not different, "grads_compared": len(grads_ref), "grads_different": different[:5],
              "eval_logits_equal": bool(torch.equal(logits_ref, logits_ld))}
    del model
    return result


def measure(args: argparse.Namespace, folder: Path, variant: str) -> dict:
    import torch

    import loradrop

    model = load_qlora(args, folder, args.p if variant == "qlora_peft_dropout" else 0.0)
    if variant.startswith("ld_"):
        samples = int(variant[len("ld_s"):])
        loradrop.apply_lora_dropout(model, loradrop.LoraDropoutConfig(p=args.p, samples=samples, seed=0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = batch(args)
    times, losses = [], []
    cuda = args.device.startswith("cuda")
    for step in range(args.warmup + args.steps):
        if step == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(args)
        start = time.perf_counter()
        with autocast(args):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    result = {"median_step_ms": round(1000 * statistics.median(times), 2),
              "min_step_ms": round(1000 * min(times), 2), "max_step_ms": round(1000 * max(times), 2),
              "steps": len(times), "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda
              else None, "first_loss": losses[0], "last_loss": losses[-1],
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del model, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    given = argv if argv is not None else sys.argv[1:]
    out = {"command": "python benchmarks/qlora_step.py " + " ".join(given),
           "settings": vars(args), "loradrop_commit": commit or None,
           "versions": {name: _version(name) for name in ("torch", "transformers", "peft", "bitsandbytes",
                                                           "accelerate")},
           "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
           or platform.machine(), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        write_base(args, folder)
        out["parity_p0"] = check_parity(args, folder)
        print("p=0 parity:", json.dumps(out["parity_p0"]), flush=True)
        for variant in args.variants:
            out["results"][variant] = measure(args, folder, variant)
            print(variant, json.dumps(out["results"][variant]), flush=True)
    base = out["results"].get("qlora")
    if base:
        for result in out["results"].values():
            result["step_ratio_vs_qlora"] = round(result["median_step_ms"] / base["median_step_ms"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'variant':20s} {'median ms':>10s} {'ratio':>6s} {'peak GiB':>9s}")
    for variant, result in out["results"].items():
        print(f"{variant:20s} {result['median_step_ms']:10.1f} {result.get('step_ratio_vs_qlora', float('nan')):6.2f} "
              f"{result['peak_memory_gib'] if result['peak_memory_gib'] is not None else float('nan'):9.2f}")
    return out


if __name__ == "__main__":
    main()
