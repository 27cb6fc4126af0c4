"""Tiny random-weight causal LMs for fast tests, built in code from a seed.

They use the real SmolLM2 tokenizer (so every tokenisation path is the one real runs take) and
real transformers architectures (so adapters are injected into the same module names), but only
two layers of width 32: a forward+backward takes milliseconds on CPU. Most of their ~1.6M
parameters are the tied 49k-token embedding; the transformer blocks hold a few tens of thousands.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def _config(architecture: str, vocab_size: int, bos: int | None, eos: int, pad: int):
    ids = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if architecture == "llama":
        return LlamaForCausalLM, LlamaConfig(**_COMMON, **ids, rms_norm_eps=1e-5)
    if architecture == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(**_COMMON, **ids, use_sliding_window=False)
    if architecture == "gemma3":
        config = Gemma3TextConfig(
            **_COMMON, **ids, head_dim=8, sliding_window=64, query_pre_attn_scalar=8, layer_types=None
        )
        return Gemma3ForCausalLM, config
    raise ValueError(f"unknown tiny architecture '{architecture}'; use llama, qwen2 or gemma3")


def build_tiny_model(
    architecture: str, vocab_size: int, bos: int | None, eos: int, pad: int, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised model of ``architecture``; the same seed gives the same weights."""
    model_class, config = _config(architecture, vocab_size, bos, eos, pad)
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG alone
        torch.manual_seed(seed)
        model = model_class(config)
    model.eval()
    return model
