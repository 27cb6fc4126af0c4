"""Inference-time options on a trained routed adapter: same logits as an adapter built with them."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import logits, randomize_adapters

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    adapter_state_dict,
    inject_adapters,
    set_inference_options,
)
from forgetless.errors import InputError


def _slim_model(alias: str, **fields):
    model, _ = load_model(alias, seed=0)
    inject_adapters(model, AdapterConfig.slim(r=4, num_experts=3, num_identity_experts=1, **fields))
    return model.eval()


def _copy_adapter(source, target) -> None:
    state = adapter_state_dict(source)
    with torch.no_grad():
        for name, tensor in target.state_dict(keep_vars=True).items():
            if name in state:
                tensor.copy_(state[name])


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gemma3"])
def test_changed_options_equal_an_adapter_built_with_them_and_restore_exactly(alias, batch):
    model = _slim_model(alias, mask_ratio=0.2)
    randomize_adapters(model, seed=3, scale=0.2)
    before = logits(model, batch)
    previous = set_inference_options(model, mask_ratio=0.6, top_k=1, yield_scale=2.0)
    assert previous == {"mask_ratio": 0.2, "top_k": 2, "yield_scale": 1.0}
    changed = logits(model, batch)
    assert not torch.allclose(changed, before)
    reference = _slim_model(alias, mask_ratio=0.6, top_k=1, yield_scale=2.0)
    _copy_adapter(model, reference)
    assert torch.equal(logits(reference, batch), changed)
    set_inference_options(model, **previous)
    assert torch.equal(logits(model, batch), before)


def test_bad_options_are_one_clear_error(batch):
    model = _slim_model("tiny-llama", yield_scale=0.0, yield_pooling="token")
    with pytest.raises(InputError, match="'mask_ratoi' is unknown. Did you mean 'mask_ratio'"):
        set_inference_options(model, mask_ratoi=0.5)
    with pytest.raises(InputError, match="mask_ratio: Input should be less than 1"):
        set_inference_options(model, mask_ratio=1.0)
    with pytest.raises(InputError, match="yield_scale > 0 needs sliding-clustering state"):
        set_inference_options(model, yield_scale=1.0)
    lora, _ = load_model("tiny-llama", seed=0)
    inject_adapters(lora, AdapterConfig.lora(r=2))
    with pytest.raises(InputError, match="no moe_lora or slim adapter layers"):
        set_inference_options(lora, mask_ratio=0.5)
