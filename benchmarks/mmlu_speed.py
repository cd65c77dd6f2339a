"""MMLU 5-shot scoring speed (issue #16): the real SmolLM2-135M + LoRA + LoRA Dropout scoring N test questions,
single pass and ensemble, with the scoring before issue #16 (`legacy_score_choices`, kept verbatim) and the current
`loradrop.tasks.mmlu.score_choices`, checking that both give the same probabilities.

    python benchmarks/mmlu_speed.py --scenario random --questions 6 --ensemble 2 \
        --out benchmarks/results/mmlu_speed.json
    python benchmarks/mmlu_speed.py --scenario per_subject --per-subject 2 --questions 6 --ensemble 2 \
        --out benchmarks/results/mmlu_speed.json

Ensemble 8 (the CLI's default), where the time goes and the estimate printed before scoring:

    python benchmarks/mmlu_speed.py --scenario per_subject_ensemble8 --per-subject 2 --questions 4 --ensemble 8 \
        --variants legacy,after_prefix --out benchmarks/results/mmlu_speed.json

Every run records wall and process CPU seconds (the CPU time is the steadier number on a shared machine) and the
load average; ``estimate`` is `estimate_line`'s forecast of the single pass + ensemble against the measured sum.

``random``: a seeded random subset of all 14,042 questions (what --max-eval-samples N gives: nearly every question
from another subject); ``per_subject``: K questions per subject in subject order (the default subset's layout, where
questions of one subject share their few-shot prefix). Each run adds its scenario to the --out file.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from loradrop.ensemble import batch_seed, ensemble_score_choices, eval_mode


@torch.no_grad()
def legacy_score_choices(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], choice_ids: list[int], *,
                  batch_size: int, ensemble: int, chunk_size: int | None, seed: int, max_len: int,
                  desc: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The MMLU scoring before issue #16 (verbatim, kept to time and check against): one left-padded batch of
    `batch_size` questions in file order, padded to its longest prompt."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep_last = "logits_to_keep" in inspect.signature(base.forward).parameters
    choices = torch.tensor(choice_ids)
    singles, ensembles, mis = [], [], []
    with eval_mode(model):
        for b, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False)):
            ids = [seq[-max_len:] for seq in tokenizer(list(prompts[start:start + batch_size]))["input_ids"]]
            width = max(len(s) for s in ids)
            input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in ids])
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
            kwargs = {"logits_to_keep": 1} if keep_last else {}
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs).logits
            singles.append(logits[:, -1, choices.to(logits.device)].float().softmax(-1).cpu())
            if ensemble:
                out = ensemble_score_choices(model, input_ids, choice_ids, ensemble, attention_mask=mask,
                                             chunk_size=chunk_size, seed=batch_seed(seed, b))
                ensembles.append(out.probs.cpu())
                mis.append(out.mutual_information.cpu())
    return (torch.cat(singles), torch.cat(ensembles) if ensembles else None, torch.cat(mis) if mis else None)


def build_model(seed: int = 0) -> tuple[Any, Any]:
    """SmolLM2-135M (offline GGUF) + PEFT LoRA r=8 on q/v (the CLI's causal-LM default) + LoRA Dropout, with a
    random non-zero B so that the members differ."""
    from peft import LoraConfig, get_peft_model

    import loradrop
    from loradrop.pretrained import load_model, load_tokenizer

    torch.manual_seed(seed)
    base = load_model("smollm2", "causal_lm")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    loradrop.apply_lora_dropout(model, loradrop.LoraDropoutConfig(p=0.5, seed=seed))
    model.eval()
    return model, load_tokenizer("smollm2")


def main(argv: Sequence[str] | None = None) -> None:
    from loradrop.tasks.base import subsample
    from loradrop.tasks.mmlu import (
        MMLU_MAX_LEN,
        choice_token_ids,
        default_subset,
        load_mmlu,
    )
    from loradrop.tasks.mmlu_scoring import MMLU_TOKENS_PER_BATCH, estimate_line, score_choices

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--ensemble", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="the CLI's default --batch-size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--skip-legacy", action="store_true")
    parser.add_argument("--single-only", action="store_true")
    parser.add_argument("--scenario", default="random")
    parser.add_argument("--per-subject", type=int, default=None,
                        help="K questions per subject (default_subset), then the first --questions of them")
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="default: MMLU_TOKENS_PER_BATCH")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--chunk-size", type=int, default=None, help="members per forward call (default: all)")
    parser.add_argument("--variants", default="legacy,after,after_prefix",
                        help="comma-separated subset of legacy (the code before #16), after (sorted batches), "
                             "after_prefix (sorted + shared few-shot prefix, the default scoring)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    model, tokenizer = build_model(args.seed)
    model.to(args.device)
    full = load_mmlu(args.data_dir, "test", k_shot=args.shots)
    if args.per_subject:
        questions = default_subset(full, args.per_subject, args.seed).select(range(args.questions))
    else:
        questions = subsample(full, args.questions, args.seed, "questions")
    prompts, subjects = list(questions["prompt"]), list(questions["subject"])
    choice_ids = choice_token_ids(tokenizer)
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    common = dict(batch_size=args.batch_size, ensemble=args.ensemble, chunk_size=args.chunk_size, seed=args.seed,
                  max_len=MMLU_MAX_LEN)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.skip_legacy:
        variants = [v for v in variants if v != "legacy"]
    tokens_per_batch = args.tokens_per_batch or MMLU_TOKENS_PER_BATCH
    record: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/mmlu_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": "SmolLM2-135M-Instruct (offline GGUF, float32) + LoRA r=8 q/v + LoRA Dropout p=0.5",
        "scenario": args.scenario, "subjects": len(set(subjects)), "questions": len(prompts), "shots": args.shots,
        "ensemble": args.ensemble, "chunk_size": args.chunk_size, "batch_size": args.batch_size,
        "tokens_per_batch": tokens_per_batch, "prompt_tokens": {"sum": sum(lengths), "min": min(lengths),
                                                                     "max": max(lengths)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__},
        "hardware": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    line, forecast = estimate_line(model, {args.shots: tokenizer(prompts)["input_ids"]},
                                   {args.shots: subjects}, batch_size=args.batch_size,
                                   ensemble=0 if args.single_only else args.ensemble, max_len=MMLU_MAX_LEN)
    print(line, flush=True)
    runs: dict[str, Any] = {}
    outputs = {}
    for label, ens in (("single", 0), ("ensemble", args.ensemble))[: 1 if args.single_only else 2]:
        kw = {**common, "ensemble": ens}
        if "legacy" in variants:
            start, cpu = time.perf_counter(), time.process_time()
            outputs[("legacy", label)] = legacy_score_choices(model, tokenizer, prompts, choice_ids, desc="legacy",
                                                              **kw)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            width = [max(lengths[i:i + args.batch_size]) * len(lengths[i:i + args.batch_size])
                     for i in range(0, len(lengths), args.batch_size)]
            runs[f"before_{label}"] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                                       "s_per_question": round(seconds / len(prompts), 3),
                                       "padded_tokens": sum(width)}
            print(f"before {label}: {seconds:.1f} s", flush=True)
        for variant, keys in (("after", None), ("after_prefix", subjects)):
            if variant not in variants:
                continue
            timing: dict[str, Any] = {}
            start, cpu = time.perf_counter(), time.process_time()
            outputs[(variant, label)] = score_choices(model, tokenizer, prompts, choice_ids, desc=variant,
                                                      timing=timing, max_tokens=tokens_per_batch, prefix_keys=keys,
                                                      **kw)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            runs[f"{variant}_{label}"] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                                          "s_per_question": round(seconds / len(prompts), 3),
                                          "padded_tokens": timing["padded_tokens"],
                                          "forward_batches": timing["forward_batches"]}
            print(f"{variant} {label}: {seconds:.1f} s", flush=True)
        if "legacy" in variants:
            for variant in [v for v in ("after", "after_prefix") if v in variants]:
                old, new = outputs[("legacy", label)], outputs[(variant, label)]
                runs[f"max_abs_diff_{variant}_{label}"] = max(float((a - b).abs().max())
                                                              for a, b in zip(old, new) if a is not None)
                runs[f"speedup_{variant}_{label}"] = round(runs[f"before_{label}"]["seconds"]
                                                           / runs[f"{variant}_{label}"]["seconds"], 2)
    record["runs"] = runs
    record["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if "after_prefix" in variants:
        measured = sum(runs[f"after_prefix_{label}"]["seconds"] for label in ("single", "ensemble")
                       if f"after_prefix_{label}" in runs)
        estimated = sum(forecast["estimated_seconds"].values())
        record["estimate"] = {"line": line, **forecast, "estimated_seconds_total": round(estimated, 1),
                              "measured_seconds_after_prefix": round(measured, 1),
                              "measured_over_estimated": round(measured / estimated, 2)}
    print(json.dumps(record, indent=2))
    if args.out:
        out = Path(args.out)
        doc = json.loads(out.read_text()) if out.is_file() else {}
        doc.setdefault("benchmark", "mmlu_speed")
        doc.setdefault("scenarios", {})[args.scenario] = record
        out.write_text(json.dumps(doc, indent=2) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
