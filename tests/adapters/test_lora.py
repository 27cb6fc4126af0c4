"""Plain LoRA: injection, PEFT equivalence, merging, regularisation, gradients."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import logits, randomize_adapters
from peft import LoraConfig, get_peft_model

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    LoRALinear,
    adapter_layers,
    adapter_regularization,
    inject_adapters,
    lora_factors,
    merge_adapters,
    trainable_parameters,
)
from forgetless.errors import InputError


def test_inject_wraps_mlp_projections_and_freezes_base(tiny):
    model, _ = tiny
    names = inject_adapters(model, AdapterConfig.lora(r=4))
    assert names == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert all(isinstance(model.get_submodule(name), LoRALinear) for name in names)
    trainable = {id(p) for p in trainable_parameters(model)}
    assert len(trainable) == 2 * len(names)
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (id(parameter) in trainable), name


def test_fresh_lora_leaves_logits_unchanged(tiny, batch):
    model, _ = tiny
    before = logits(model, batch)
    inject_adapters(model, AdapterConfig.lora(r=4))
    assert torch.equal(logits(model, batch), before)


def test_regex_and_attention_targets(tiny):
    model, _ = tiny
    names = inject_adapters(
        model, AdapterConfig.lora(target_modules=[r"model\.layers\.1\.self_attn\.[qv]_proj"])
    )
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_no_matching_module_is_an_input_error_listing_names(tiny):
    model, _ = tiny
    with pytest.raises(InputError, match=r"match no nn.Linear module.*model.layers.N.mlp.gate_proj"):
        inject_adapters(model, AdapterConfig.lora(target_modules=["gate_projection"]))


def test_injecting_twice_into_the_same_module_is_an_error(tiny):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.lora())
    with pytest.raises(InputError, match="already has a lora adapter; merge_adapters"):
        inject_adapters(model, AdapterConfig.lora())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_equals_peft_lora(tiny, batch, dropout):
    model, alias = tiny
    peft_model = get_peft_model(
        load_model(alias, seed=0)[0],
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["gate_proj", "up_proj", "down_proj"]
        ),
    )
    inject_adapters(model, AdapterConfig.lora(r=4, alpha=8, dropout=dropout))
    randomize_adapters(model)
    with torch.no_grad():
        for name, (a, b, scaling) in lora_factors(model).items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
            assert scaling == peft_layer.scaling["default"] == 2.0
    peft_model.eval()
    expected = logits(peft_model, batch)
    assert not torch.allclose(expected, logits(load_model(alias, seed=0)[0], batch), atol=1e-3)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


def test_merge_folds_delta_and_restores_linear(tiny, batch):
    model, _ = tiny
    names = inject_adapters(model, AdapterConfig.lora(r=4))
    randomize_adapters(model, scale=0.2)
    adapted = logits(model, batch)
    merge_adapters(model)
    assert not adapter_layers(model)
    assert all(type(model.get_submodule(name)) is torch.nn.Linear for name in names)
    torch.testing.assert_close(logits(model, batch), adapted, atol=1e-5, rtol=1e-5)
    assert inject_adapters(model, AdapterConfig.lora(r=2)) == names  # the next stage starts fresh


def test_gradients_reach_only_adapter_parameters(tiny, batch):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.lora(r=4))
    randomize_adapters(model, scale=0.1)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    trainable = {id(p) for p in trainable_parameters(model)}
    for name, parameter in model.named_parameters():
        if id(parameter) in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_regularization_is_exact_zero_without_weights(tiny):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.lora(r=4))
    randomize_adapters(model)
    reg = adapter_regularization(model)
    assert reg.item() == 0.0 and reg.dim() == 0


def test_l1_penalty_matches_formula_on_hand_example():
    base = torch.nn.Linear(3, 2, bias=False)
    config = AdapterConfig.lora(r=2, alpha=2, l1_weight=0.5)
    model = torch.nn.Sequential()
    model.add_module("proj", base)
    inject_adapters(model, config.model_copy(update={"target_modules": ["proj"]}))
    layer = model.proj
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, -0.5]]))  # |A|_1 = 4
        layer.lora_B.copy_(torch.tensor([[3.0, 0.0], [-1.0, 2.0]]))  # |B|_1 = 6
    # L1 = |B|_1 / (r d_out) + |A|_1 / (r d_in) = 6 / 4 + 4 / 6
    assert layer.l1_penalty().item() == pytest.approx(6 / 4 + 4 / 6)
    assert adapter_regularization(model).item() == pytest.approx(0.5 * (6 / 4 + 4 / 6))


def test_config_errors_are_one_line_input_errors():
    with pytest.raises(InputError, match="num_experts: kind lora has num_experts=1"):
        AdapterConfig.lora(num_experts=3)
    with pytest.raises(InputError, match="unknown key 'rr'. Did you mean 'r'"):
        AdapterConfig.from_dict({"kind": "lora", "rr": 4})
    with pytest.raises(InputError, match="unknown adapter kind 'loraa'. Did you mean 'lora'"):
        AdapterConfig.from_dict({"kind": "loraa"})
    with pytest.raises(InputError, match="r: Input should be greater than or equal to 1"):
        AdapterConfig.lora(r=0)
