"""An expert mixture as one LoRA: the concatenation, pinned on a hand-computed example, and
exactness whenever the routing does not depend on the token."""

from __future__ import annotations

import json

import torch
from export_helpers import import_file, logits, randomize, stock_model

from forgetless import load_model
from forgetless.adapters import AdapterConfig, adapter_layers, inject_adapters, save_adapter
from forgetless.data.formatting import PromptFormatter
from forgetless.export import concatenate_experts, export_model


def test_concatenated_experts_equal_the_weighted_sum_by_hand():
    # two experts of rank 1: A_0 = [1, 0], A_1 = [0, 1]; B_0 = [1, 2]^T, B_1 = [3, 4]^T
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (E r, d_out): B_e transposed, stacked
    scales, weights = torch.tensor([2.0, 0.5]), torch.tensor([0.25, 0.5])
    big_a, big_b = concatenate_experts(a, b, scales, weights)
    # 0.25 * 2 * B_0 A_0 + 0.5 * 0.5 * B_1 A_1 = [[0.5, 0.75], [1.0, 1.0]]
    assert torch.equal(big_a, a)
    assert torch.equal(big_b, torch.tensor([[0.5, 0.75], [1.0, 1.0]]))
    assert torch.equal(big_b @ big_a, torch.tensor([[0.5, 0.75], [1.0, 1.0]]))


def _export(model, tmp_path, name):
    save_adapter(model, tmp_path / name, base_model="tiny-llama")
    out = tmp_path / f"out-{name}"
    manifest = export_model(
        "tiny-llama", out, adapter=tmp_path / name, calibration=["kelvar_dates"], calibration_limit=2
    )
    return out, manifest


def test_one_lora_expert_without_identity_experts_exports_exactly(tmp_path):
    model, tokenizer = load_model("tiny-llama", seed=0)
    inject_adapters(model, AdapterConfig.moe_lora(r=4, num_experts=1, top_k=1))
    randomize(model, seed=5)
    model.eval()
    out, manifest = _export(model, tmp_path, "single")
    assert manifest["exact"] and manifest["adapters"]["adapter"]["exact"]
    assert manifest["adapters"]["adapter"]["rank"] == 4
    ids = torch.tensor([PromptFormatter(tokenizer).prompt_ids("what does kelvar 12 mean?")])
    served = logits(stock_model(out, "adapter"), ids)
    torch.testing.assert_close(served, logits(model, ids), atol=1e-5, rtol=1e-5)
    assert manifest["gap"]["all"]["max_abs_logit_diff_max"] < 1e-5
    router = import_file(out / "router.py", "router_single").Router(out)
    assert router.route("anything") == "adapter"  # no gate: always the one adapter


def test_token_independent_routing_exports_exactly_with_masks_and_identity_experts(tmp_path):
    # zero routers and no yielding shift: every token gets the same weights, so the mean routing
    # weights are the weights, and the one LoRA equals the mixture (dynamic-merging masks included)
    model, tokenizer = load_model("tiny-llama", seed=0)
    config = AdapterConfig.slim(r=4, num_experts=2, top_k=4, yield_pooling="token", yield_scale=0.0)
    inject_adapters(model, config, tokenizer=tokenizer)
    randomize(model, seed=6)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.router.zero_()
    model.eval()
    out, manifest = _export(model, tmp_path, "constant")
    adapter = manifest["adapters"]["adapter"]
    assert not adapter["exact"] and adapter["rank"] == 8 and config.mask_ratio > 0
    assert abs(adapter["routing"]["lora_share"] - 0.5) < 1e-6  # 2 of 4 equal logits are identity experts
    ids = torch.tensor([PromptFormatter(tokenizer).prompt_ids("Name the capital of Chile.")])
    served = logits(stock_model(out, "adapter"), ids)
    torch.testing.assert_close(served, logits(model, ids), atol=1e-5, rtol=1e-5)
    saved = json.loads((out / "adapters" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 8  # the scaling is folded into B
