"""MoLA's layer-wise expert counts: each layer's own mixture, saved and loaded whole, refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import logits, randomize_adapters

from forgetless import load_model
from forgetless.adapters import AdapterConfig, adapter_layers, inject_adapters, load_adapter, save_adapter
from forgetless.errors import InputError
from forgetless.export.layout import describe
from forgetless.strategies import make_strategy


def _layer_number(name: str) -> int:
    return next(int(part) for part in name.split(".") if part.isdigit())


def test_each_layer_group_gets_its_own_number_of_experts(tiny, batch, tmp_path):
    model, alias = tiny
    config = AdapterConfig.moe_lora(r=4, layer_experts=[1, 3], top_k=1)
    assert config.num_experts == 3
    inject_adapters(model, config)
    layers = adapter_layers(model)
    depths = sorted({_layer_number(name) for name in layers})
    assert len(depths) >= 2
    for name, layer in layers.items():
        wanted = 1 if depths.index(_layer_number(name)) * 2 // len(depths) == 0 else 3
        assert layer.config.num_experts == wanted and layer.lora_A.shape[0] == wanted
        assert layer.router.shape[0] == wanted
    randomize_adapters(model, scale=0.3)
    model.eval()
    expected = logits(model, batch)
    folder = save_adapter(model, tmp_path / "mola", base_model=alias)
    fresh, _ = load_model(alias, seed=0)
    load_adapter(fresh, folder, base_model=alias)
    assert [layer.lora_A.shape[0] for layer in adapter_layers(fresh).values()] == [
        layer.lora_A.shape[0] for layer in layers.values()
    ]
    assert torch.equal(logits(fresh, batch), expected)
    with pytest.raises(InputError, match="no GPU-engine export"):
        describe(model)


def test_module_groups_split_the_distinct_layers_lowest_first():
    config = AdapterConfig.moe_lora(layer_experts=[2, 4, 6, 8])
    names = [
        f"model.layers.{i}.mlp.{proj}" for i in range(30) for proj in ("gate_proj", "up_proj", "down_proj")
    ]
    counts = [c.num_experts for c in config.for_modules(names)]
    assert counts[:24] == [2] * 24 and counts[-21:] == [8] * 21  # layers 0-7 and 23-29
    assert counts == sorted(counts)
    assert all(c.shared() == config for c in config.for_modules(names))
    assert make_strategy("mola").adapter_settings() == {"layer_experts": [2, 4, 6, 8], "top_k": 2}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layer_experts": [1, 4], "top_k": 2}, "more than the 1 experts of the smallest group"),
        ({"layer_experts": [2, 4], "yield_pooling": "sample"}, "unset layer_experts"),
    ],
)
def test_layer_experts_refuses_what_cannot_work(fields, message):
    with pytest.raises(InputError, match=message):
        AdapterConfig.moe_lora(r=4, **fields)
