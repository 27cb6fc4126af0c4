"""The mixtures' auxiliary losses: LoRAMoE's localized balancing constraint on hand examples and in a layer."""

from __future__ import annotations

import statistics

import pytest
import torch
from adapter_helpers import randomize_adapters

from forgetless.adapters import AdapterConfig, adapter_layers, adapter_regularization, inject_adapters
from forgetless.adapters.regularisers import localized_balance
from forgetless.errors import InputError
from forgetless.strategies import make_strategy


def test_localized_balance_is_the_squared_cv_of_the_type_weighted_importance():
    # two sequences of two tokens, two LoRA experts (+ one identity column, which is ignored);
    # the second sequence's second token is padding
    weights = torch.tensor([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.5, 0.5, 0.0], [0.1, 0.9, 0.0]])
    mask = torch.tensor([True, True, True, False])
    # importance Q: (1.4, 0.6) and (0.5, 0.5); the task half (expert 1) takes 1 + delta
    entries = [1.4 * 0.9, 0.6 * 1.1, 0.5 * 0.9, 0.5 * 1.1]
    expected = statistics.variance(entries) / statistics.mean(entries) ** 2
    assert localized_balance(weights, mask, 2, 2, 0.1).item() == pytest.approx(expected, rel=1e-6)
    # without the mask the padded token counts
    entries[2:] = [0.6 * 0.9, 1.4 * 1.1]
    expected = statistics.variance(entries) / statistics.mean(entries) ** 2
    assert localized_balance(weights, None, 2, 2, 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_localized_balance_is_zero_where_the_weighted_importances_are_equal():
    # Q = (1.1, 0.9) per sequence: I * Q = (0.9 * 1.1, 1.1 * 0.9), all equal
    weights = torch.tensor([[0.55, 0.45], [0.55, 0.45]])
    assert localized_balance(weights, None, 2, 2, 0.1).item() == pytest.approx(0.0, abs=1e-12)
    assert localized_balance(weights, None, 2, 2, 0.0).item() > 0.0


def test_a_loramoe_layer_trains_with_its_localized_balance(tiny, batch):
    model, _ = tiny
    settings = make_strategy("loramoe").adapter_settings()
    config = AdapterConfig.moe_lora(r=4, **settings)
    assert config.top_k == config.num_experts == 8 and config.balance_form == "localized"
    inject_adapters(model, config)
    randomize_adapters(model)
    model.train()
    model(**batch)
    layers = list(adapter_layers(model).values())
    rows = batch["input_ids"].shape[0]
    for layer in layers[:2]:  # the layer's term is the function of its own routing this forward
        hidden = {}
        layer.recorder = lambda _layer, weights, _chosen, _signal, mask, seen=hidden: seen.update(
            w=weights, m=mask
        )
        model(**batch)
        layer.recorder = None
        expected = localized_balance(hidden["w"], hidden["m"], rows, 8, 0.1)
        torch.testing.assert_close(layer.balance_loss().detach(), expected)
    total = torch.stack([layer.balance_loss() for layer in layers]).mean() * 0.1
    torch.testing.assert_close(adapter_regularization(model), total)
    total.backward()
    assert all(layer.router.grad is not None and layer.router.grad.abs().sum() > 0 for layer in layers)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_experts": 5, "top_k": 5}, "use an even number"),
        ({"layer_experts": [3, 6], "top_k": 2}, "num_experts is 3, 6, use an even number"),
        ({"yield_pooling": "sample"}, "use balance_form load"),
    ],
)
def test_localized_balance_refuses_what_it_cannot_split(fields, message):
    with pytest.raises(InputError, match=message):
        AdapterConfig.moe_lora(r=4, balance_form="localized", **fields)
