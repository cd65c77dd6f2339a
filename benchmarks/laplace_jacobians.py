"""The Laplace-LoRA predictive's Jacobians, two ways, on the real SmolLM2 in cloze form: `hooked_jacobians` (one
backward pass per batch) against laplace-torch's ``jacrev`` one question at a time (`laplace_baseline._moments`'s
fallback). Same model, same batches; records both times and the largest difference between the two.

Run from the repository root, with laplace-torch importable and a local SmolLM2 folder (de-quantised with
``studies/commonsense/dequantize_smollm2.py``, or the hub name where it can be downloaded):

    PYTHONPATH=<laplace-torch site> .venv/bin/python benchmarks/laplace_jacobians.py --model /tmp/smol \\
        --out benchmarks/results/laplace/jacobians_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from bench_common import header
from loradrop.app import laplace_jacobians
from loradrop.app.laplace_baseline import _ClozeLogits, _moments, lora_parameters_only
from loradrop.pretrained import load_model, load_tokenizer, prepare_base
from loradrop.tasks import get_task, prepare_task
from loradrop.tasks.cloze_scoring import with_choice_scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="winogrande_s")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from laplace import Laplace

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.model)
    spec = with_choice_scoring(get_task(args.task), "cloze_mean")
    data = prepare_task(spec, args.data_dir, tokenizer, max_seq_len=320, seed=0, max_eval_samples=args.questions,
                        need_train=False)
    base = prepare_base(load_model(args.model, "causal_lm", attn_implementation="eager"), tokenizer)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,  # non-zero B: real Jacobians
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, lora).to(device).eval()
    lora_parameters_only(model)
    net = _ClozeLogits(model, data.extras["num_choices"], data.extras["per_token"])
    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="kron", dict_key_x="choice_mask")
    collator = data.extras["eval_collator"]
    split = data.extras["encoded"][data.eval_split]
    batches = [collator([split[i] for i in range(s, min(s + args.batch_size, len(split)))])
               for s in range(0, len(split), args.batch_size)]

    def run(hooked: bool) -> tuple[float, list[torch.Tensor]]:
        original = laplace_jacobians.hooked_jacobians
        if not hooked:
            laplace_jacobians.hooked_jacobians = lambda net, batch: None  # `_moments` falls back to laplace-torch
        try:
            start = time.perf_counter()
            js = [_moments(la, batch)[0] for batch in batches]
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, js
        finally:
            laplace_jacobians.hooked_jacobians = original

    run(True)  # warm-up (allocator, kernels)
    hooked_s, hooked = run(True)
    fallback_s, fallback = run(False)
    difference = max(float((a - b).abs().max()) for a, b in zip(hooked, fallback))
    scale = max(float(b.abs().max()) for b in fallback)
    payload = header("laplace_jacobians", device, {
        "model": args.model, "task": args.task, "questions": len(split), "batch_size": args.batch_size,
        "lora": {"r": 8, "alpha": 16, "targets": "q,k,v,o"},
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "hooked_s": hooked_s, "laplace_torch_one_question_at_a_time_s": fallback_s,
        "speedup": fallback_s / hooked_s, "max_abs_difference": difference, "max_abs_jacobian": scale})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"hooked {hooked_s:.1f} s, laplace-torch one question at a time {fallback_s:.1f} s "
          f"({fallback_s / hooked_s:.2f}x); max |difference| {difference:.2e} (max |J| {scale:.2e}); wrote {args.out}")


if __name__ == "__main__":
    main()
