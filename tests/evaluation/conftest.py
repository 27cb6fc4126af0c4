"""Fixtures for evaluation tests: tiny models of every family we evaluate (seconds on CPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_mixtral(tokenizer):
    """A 2-layer random Mixtral (MoE) with the SmolLM2 tokenizer's vocabulary."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return MixtralForCausalLM(config).eval()


def _full_sequence_loglik(model, prompt: list[int], choice: list[int]) -> float:
    from forgetless.adapters.gate import prompt_boundary

    boundary = torch.tensor([[True] * len(prompt) + [False] * len(choice)])
    with torch.no_grad(), prompt_boundary(model, boundary):  # SLIM's gate decides from the prompt
        logits = model(torch.tensor([prompt + choice])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return sum(float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(choice))


@pytest.fixture()
def full_sequence_loglik():
    """Reference log-likelihood: one unbatched forward over prompt + choice, no cache."""
    return _full_sequence_loglik
