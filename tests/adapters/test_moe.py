"""build_lora_moe: trained LoRA adapters as frozen experts of one routed layer."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import logits, randomize_adapters

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    adapter_layers,
    build_lora_moe,
    inject_adapters,
    load_adapter,
    lora_factors,
    merge_adapters,
    save_adapter,
    trainable_parameters,
)
from forgetless.errors import InputError


def _trained_lora(alias: str, r: int, seed: int):
    """(factors detached, logits function input -> adapted model) of a random LoRA adapter."""
    model, _ = load_model(alias, seed=0)
    inject_adapters(model, AdapterConfig.lora(r=r, alpha=2 * r))
    randomize_adapters(model, seed=seed, scale=0.3)
    factors = {
        name: (a.detach().clone(), b.detach().clone(), s) for name, (a, b, s) in lora_factors(model).items()
    }
    return factors, model


def test_single_expert_moe_equals_the_lora(tiny, batch):
    model, alias = tiny
    factors, lora_model = _trained_lora(alias, r=4, seed=1)
    expected = logits(lora_model, batch)
    names = build_lora_moe(model, [factors], top_k=1)
    assert names == list(factors)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


def test_experts_of_different_rank_are_padded_and_frozen(tiny, batch):
    model, alias = tiny
    small, small_model = _trained_lora(alias, r=2, seed=1)
    big, _ = _trained_lora(alias, r=4, seed=2)
    # a zero router ties every logit and ties go to the first expert: K=1 then means "expert 0"
    build_lora_moe(model, [small, big], top_k=1)
    for layer in adapter_layers(model).values():
        assert layer.lora_A.shape[1] == 4 and not layer.lora_A.requires_grad
        assert torch.equal(layer.lora_A[0, 2:], torch.zeros(2, layer.in_features))
    assert {id(p) for p in trainable_parameters(model)} == {
        id(layer.router) for layer in adapter_layers(model).values()
    }
    torch.testing.assert_close(logits(model, batch), logits(small_model, batch), atol=1e-5, rtol=0)


def test_router_init_is_used_and_saved(tiny, batch, tmp_path):
    model, alias = tiny
    first, _ = _trained_lora(alias, r=4, seed=1)
    second, second_model = _trained_lora(alias, r=4, seed=2)
    zero_router = {name: torch.zeros(3, model.get_submodule(name).in_features) for name in first}
    build_lora_moe(model, [second, first], top_k=1, num_identity_experts=1, router_init=zero_router)
    torch.testing.assert_close(logits(model, batch), logits(second_model, batch), atol=1e-5, rtol=0)

    routed, _ = load_model(alias, seed=0)
    generator = torch.Generator().manual_seed(0)
    router_init = {
        name: torch.randn(3, weight.shape[1], generator=generator) for name, weight in zero_router.items()
    }
    build_lora_moe(routed, [second, first], top_k=2, num_identity_experts=1, router_init=router_init)
    for name, layer in adapter_layers(routed).items():
        assert torch.equal(layer.router.detach(), router_init[name])
    folder = save_adapter(routed, tmp_path / "moe", base_model=alias)
    fresh, _ = load_model(alias, seed=0)
    load_adapter(fresh, folder)
    assert torch.equal(logits(fresh, batch), logits(routed, batch))


def test_wrong_shapes_are_input_errors_before_touching_the_model(tiny):
    model, alias = tiny
    factors, _ = _trained_lora(alias, r=4, seed=1)
    name = next(iter(factors))
    with pytest.raises(InputError, match=r"router_init\[.*\] has shape \[2, 5\]"):
        build_lora_moe(model, [factors], top_k=1, router_init={name: torch.zeros(2, 5)})
    broken = dict(factors)
    a, b, s = broken[name]
    broken[name] = (a[:, :-1], b, s)
    with pytest.raises(InputError, match="expert 1: .* do not fit"):
        build_lora_moe(model, [factors, broken], top_k=1)
    assert not adapter_layers(model)
    with pytest.raises(InputError, match="share no module"):
        build_lora_moe(model, [{"x": factors[name]}, {"y": factors[name]}], top_k=1)


def test_merge_then_moe_on_the_merged_model(tiny, batch):
    """Adapters are frozen experts; merging a plain LoRA first leaves a clean base for mixing."""
    model, alias = tiny
    factors, _ = _trained_lora(alias, r=2, seed=3)
    inject_adapters(model, AdapterConfig.lora(r=2))
    merge_adapters(model)
    assert build_lora_moe(model, [factors], top_k=1) == list(factors)
