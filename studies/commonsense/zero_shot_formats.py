"""Zero-shot accuracy of a causal LM on ARC-Easy / ARC-Challenge / OpenBookQA dev in the two scoring formats of
`loradrop.tasks`: letters (the answer letter's next-token logit after the lettered choices, `commonsense_scoring`)
and cloze (each choice's summed log-likelihood after the question, `cloze_scoring`; also per character, as
lm-evaluation-harness's acc_norm). Why the commonsense plans score by cloze (studies/commonsense/tune.yaml).

    python studies/commonsense/zero_shot_formats.py /tmp/smol ../shared/data 150 arc_easy arc_challenge openbookqa

(/tmp/smol: `python studies/commonsense/dequantize_smollm2.py /tmp/smol`.) Questions: the first N of each dev file
after a fixed shuffle (seed 0). Prints one line per task; results/zero_shot_formats/ holds the committed output.
"""

from __future__ import annotations

import random
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loradrop.tasks import get_task, load_task_data
from loradrop.tasks.cloze_scoring import cloze_parts
from loradrop.tasks.commonsense_scoring import LETTERS, format_choice_prompt


@torch.no_grad()
def main(model_dir: str, data_dir: str, n: int, tasks: list[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    letter_ids = [tokenizer(" " + x, add_special_tokens=False)["input_ids"][-1] for x in LETTERS]
    for task in tasks:
        dev = load_task_data(get_task(task), data_dir)["validation"]
        order = list(range(len(dev)))
        random.Random(0).shuffle(order)
        right = {"letter": 0, "cloze": 0, "cloze_per_char": 0}
        for i in order[:n]:
            row = dev[i]
            k, answer = len(row["choices"]), row["label"]
            ids = torch.tensor([tokenizer(format_choice_prompt("question", row["question"], row["choices"]))
                                ["input_ids"]])
            right["letter"] += int(model(ids).logits[0, -1, letter_ids[:k]].argmax()) == answer
            sums, per_char = [], []
            for prefix, continuation in cloze_parts("question", row["question"], row["choices"]):
                head = tokenizer(prefix)["input_ids"]
                tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
                seq = torch.tensor([head + tail])
                logp = model(seq).logits[0, :-1].log_softmax(-1)
                score = float(logp[torch.arange(len(head) - 1, seq.shape[1] - 1), seq[0, len(head):]].sum())
                sums.append(score)
                per_char.append(score / max(1, len(continuation.strip())))
            right["cloze"] += max(range(k), key=sums.__getitem__) == answer
            right["cloze_per_char"] += max(range(k), key=per_char.__getitem__) == answer
        m = min(n, len(dev))
        print(f"{task}: n={m} " + " ".join(f"{name} {v / m:.3f}" for name, v in right.items()), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
