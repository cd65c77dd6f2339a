"""Tiny random models saved as local folders, for end-to-end runs of ``loradrop train`` / ``loradrop eval``.

The encoder uses the real MiniLM tokenizer (BERT WordPiece) and the decoder the real SmolLM2 tokenizer, so the task
preprocessing is the real one; only the weights are tiny and random. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_bert(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT (BertModel weights: task heads are created by the run) + MiniLM's tokenizer."""
    from loradrop.pretrained import minilm_dir
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.0, architectures=["BertModel"])
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path) -> Path:
    """A 2-layer, 32-wide Llama causal LM + SmolLM2's tokenizer (read from the offline GGUF)."""
    from loradrop.pretrained import load_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("smollm2")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
