"""De-quantise the offline SmolLM2-135M-Instruct GGUF once into a plain safetensors model folder, and check it.

Every sweep run otherwise de-quantises the GGUF itself (about 40 s of each run's wall time on the GPU machine, see
results/gpu_probe/README.md). transformers refuses `save_pretrained` on a GGUF-loaded model ("quantized with gguf and
is not serializable"), so the weights are written with safetensors directly and the config without its GGUF
quantisation entry. The check reloads the folder and requires the same tokens and bit-identical logits.

    python studies/commonsense/dequantize_smollm2.py /tmp/smol      # then: loradrop sweep ... --set model=/tmp/smol
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loradrop.pretrained import load_model, load_tokenizer


def dequantize(out: Path) -> float:
    """Write the de-quantised model and tokenizer to `out`; returns the largest logit difference to the GGUF load."""
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2", "causal_lm"), load_tokenizer("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: transformers re-ties it to the embeddings on load
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved {out} in {time.perf_counter() - start:.1f} s ({sum(v.numel() for v in state.values()):,} values)")
    again, tokenizer2 = load_model(str(out), "causal_lm"), load_tokenizer(str(out))
    text = "Question: Which gas do plants take in from the air?\nA. oxygen\nB. carbon dioxide\nAnswer:"
    ids, ids2 = tokenizer(text, return_tensors="pt").input_ids, tokenizer2(text, return_tensors="pt").input_ids
    if not torch.equal(ids, ids2):
        raise SystemExit(f"tokenizers differ: {ids.tolist()} vs {ids2.tolist()}")
    with torch.no_grad():
        diff = (model(ids).logits - again(ids).logits).abs().max().item()
    print(f"tokens equal; max |logit difference| {diff:.3g}")
    if diff != 0.0:
        raise SystemExit("the saved model's logits differ from the GGUF load")
    return diff


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python studies/commonsense/dequantize_smollm2.py OUT_FOLDER")
    dequantize(Path(sys.argv[1]))
