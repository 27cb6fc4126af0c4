"""Choosing experts from router logits: top-K and MixLoRA-Dy's dynamic top-p, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from forgetless.adapters import AdapterConfig, inject_adapters
from forgetless.adapters.selection import select_experts, taken_slots
from forgetless.errors import InputError


def test_top_k_is_a_softmax_over_the_k_best():
    logits = torch.tensor([[2.0, 0.0, 1.0]])
    weights, chosen = select_experts(logits, top_k=2)
    assert chosen.tolist() == [[0, 2]]
    e = math.e
    torch.testing.assert_close(weights, torch.tensor([[e / (e + 1), 0.0, 1 / (e + 1)]]))


def test_top_p_takes_experts_until_the_cumulative_probability_reaches_p():
    # probabilities of row 0: (0.7, 0.2, 0.1); of row 1: (0.4, 0.35, 0.25)
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    weights, chosen = select_experts(probabilities.log(), top_k=3, top_p=0.6)
    # row 0: 0.7 >= 0.6 after the first expert; row 1: 0.4 < 0.6, so the second too (0.75)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.4 / 0.75, 0.35 / 0.75, 0.0]])
    torch.testing.assert_close(weights, expected)
    assert taken_slots(weights, chosen).tolist() == [[True, False, False], [True, True, False]]
    # top_k still caps the count; top_p = 1 with top_k = all is a dense softmax
    capped, _ = select_experts(probabilities.log(), top_k=1, top_p=0.99)
    assert capped.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    dense, _ = select_experts(probabilities.log(), top_k=3, top_p=1.0)
    torch.testing.assert_close(dense, probabilities)


def test_top_p_router_gradient_flows_through_every_logit():
    logits = torch.tensor([[0.5, 0.1, -0.2, 0.0]], requires_grad=True)
    weights, _ = select_experts(logits, top_k=4, top_p=0.3)
    (weights * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert logits.grad is not None


def test_balance_counts_only_the_experts_a_token_takes():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(3, 2, bias=False))
    inject_adapters(
        model, AdapterConfig.moe_lora(r=1, num_experts=2, top_k=2, top_p=0.5, target_modules=["proj"])
    )
    layer = model.proj
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0]])  # expert 0 alone passes 0.5
    weights, chosen = select_experts(logits, 2, 0.5)
    p0 = torch.softmax(logits, dim=1)[:, 0].mean()
    # every taken slot is expert 0: f = (1, 0), so the loss is 2 * p0
    assert layer._balance_term(logits, weights, chosen, None, 1).item() == pytest.approx(
        2 * p0.item(), rel=1e-6
    )


def test_top_p_is_refused_for_plain_lora():
    with pytest.raises(InputError, match="top_p: kind lora has no router"):
        AdapterConfig.lora(r=4, top_p=0.5)
