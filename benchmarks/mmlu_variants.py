"""Where MMLU ensemble scoring could still save time (issue #16), measured in process CPU seconds (steadier than wall
time on a shared machine): the default scoring (all members in one forward call) against member chunks of 4 and 2
and against bf16 autocast, on the real SmolLM2-135M + LoRA + LoRA Dropout, 5-shot, ensemble of 8, the first
--questions of the default 2-per-subject subset; rounds interleave the variants.

    python benchmarks/mmlu_variants.py --rounds 2 --out benchmarks/results/mmlu_variants.json
    python benchmarks/mmlu_variants.py --profile --questions 6     # cProfile of the default scoring, top 25 ops
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmlu_speed import build_model  # noqa: E402


def main() -> None:
    from loradrop.tasks.mmlu import MMLU_MAX_LEN, choice_token_ids, default_subset, load_mmlu
    from loradrop.tasks.mmlu_scoring import score_choices

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--ensemble", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile the default scoring once and stop")
    args = parser.parse_args()

    model, tok = build_model(0)
    qs = default_subset(load_mmlu(None, "test", k_shot=5), 2, 0).select(range(args.questions))
    prompts, subjects = list(qs["prompt"]), list(qs["subject"])
    ids = choice_token_ids(tok)

    def run(chunk: int | None = None, bf16: bool = False):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            return score_choices(model, tok, prompts, ids, batch_size=32, ensemble=args.ensemble, chunk_size=chunk,
                                 seed=0, max_len=MMLU_MAX_LEN, desc="p", prefix_keys=subjects)

    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(run)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    variants = {"all members in one call (default)": {}, "chunks of 4 members": {"chunk": 4},
                "chunks of 2 members": {"chunk": 2}, "bf16 autocast": {"bf16": True}}
    times: dict[str, list] = {k: [] for k in variants}
    outs = {}
    load = [round(x, 2) for x in os.getloadavg()]
    for _ in range(args.rounds):
        for name, kw in variants.items():
            cpu, wall = time.process_time(), time.perf_counter()
            outs[name] = run(**kw)
            times[name].append({"cpu_seconds": round(time.process_time() - cpu, 2),
                                "wall_seconds": round(time.perf_counter() - wall, 2)})
            print(name, times[name][-1], flush=True)
    base = outs["all members in one call (default)"]
    record = {"benchmark": "mmlu_variants", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/mmlu_variants.py " + " ".join(sys.argv[1:]),
              "questions": len(prompts), "subjects": len(set(subjects)), "shots": 5, "ensemble": args.ensemble,
              "load_average": {"start": load, "end": [round(x, 2) for x in os.getloadavg()]},
              "torch": torch.__version__, "cores": os.cpu_count(),
              "variants": {k: {"runs": v, "max_abs_diff_vs_default": max(float((a - b).abs().max())
                                                                         for a, b in zip(base, outs[k]))}
                           for k, v in times.items()}}
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
