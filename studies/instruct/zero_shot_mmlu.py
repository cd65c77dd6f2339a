"""Zero-shot (no fine-tuning) MMLU of SmolLM2-135M-Instruct in the instruct study's evaluation: the default subset
(2 seeded questions per subject, 114 of 14,042, seed 0), 0-shot and 5-shot, single pass, scored by answer letter
and in cloze form (`loradrop.tasks.mmlu_cloze`), to choose the study's `choice_scoring`. CPU, float32.

    .venv/bin/python studies/commonsense/dequantize_smollm2.py /tmp/smol   # once
    .venv/bin/python studies/instruct/zero_shot_mmlu.py /tmp/smol letter,cloze_mean \
        studies/instruct/results/zero_shot_mmlu/zero_shot.json

Each scoring's entry is added to the JSON (existing entries of other scorings are kept), with its wall time.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loradrop.pretrained import load_model
from loradrop.tasks.mmlu import evaluate_mmlu, load_mmlu_eval


def main(model_dir: str, scorings: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, "causal_lm").eval()
    path = Path(out)
    result = json.loads(path.read_text()) if path.exists() else {}
    result["setup"] = {"model": "SmolLM2-135M-Instruct (de-quantised GGUF)", "questions": "default subset, seed 0",
                       "torch": torch.__version__, "machine": platform.machine(), "cpus": torch.get_num_threads()}
    for scoring in scorings.split(","):
        metadata: dict = {}
        sets = load_mmlu_eval(None, None, 0, metadata, scoring=scoring)
        start = time.time()
        evaluation = evaluate_mmlu(model, sets, tokenizer, metadata, batch_size=4, ensemble=0, chunk_size=None,
                                   seed=0, scoring=scoring)
        result[scoring] = {key: {m: round(v, 4) for m, v in evaluation.single[key].items()
                                 if m in ("accuracy", "ece", "nll", "brier", "n")}
                           for key in ("mmlu_0shot", "mmlu_5shot")}
        result[scoring]["seconds"] = round(time.time() - start, 1)
        print(scoring, result[scoring], flush=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
