"""SLIM / MoE-LoRA mixture layer: the degenerate cases, routing, clustering, gradients, persistence."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import logits, randomize_adapters
from peft import LoraConfig, get_peft_model

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    MixtureLinear,
    adapter_layers,
    adapter_regularization,
    inject_adapters,
    load_adapter,
    lora_factors,
    merge_adapters,
    routing_diagnostics,
    save_adapter,
    trainable_parameters,
)
from forgetless.errors import InputError


def _push_clusters_far_away(model) -> None:
    """Centres far from every real token: d(x) is huge, so yielding sends every token to identity."""
    for layer in adapter_layers(model).values():
        layer.clusters.centres.fill_(1e3)
        layer.clusters.variances.fill_(1.0)
        layer.clusters.reference_mean.fill_(1.0)


def test_all_tokens_routed_to_identity_equals_base_exactly(tiny, batch):
    model, _ = tiny
    base = logits(model, batch)
    inject_adapters(model, AdapterConfig.slim(r=4, num_experts=3, num_identity_experts=2, top_k=2))
    randomize_adapters(model, scale=0.5)
    assert not torch.allclose(logits(model, batch), base, atol=1e-3)  # the experts do change the output
    _push_clusters_far_away(model)
    report = routing_diagnostics(model, [batch])
    assert report["identity_tokens"] == 1.0 and report["identity_share"] == 1.0
    assert torch.equal(logits(model, batch), base)


def test_one_expert_top1_no_identity_no_mask_equals_peft_lora(tiny, batch):
    model, alias = tiny
    inject_adapters(model, AdapterConfig.moe_lora(r=4, alpha=8, num_experts=1, top_k=1))
    randomize_adapters(model, scale=0.5)
    peft_model = get_peft_model(
        load_model(alias, seed=0)[0],
        LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, layer in adapter_layers(model).items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A[0])
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[0])
    peft_model.eval()
    torch.testing.assert_close(logits(model, batch), logits(peft_model, batch), atol=1e-5, rtol=0)


def test_same_seed_same_eval_output_and_masks_change_it(tiny, batch):
    model, alias = tiny
    config = AdapterConfig.slim(r=4, mask_ratio=0.5, seed=3)
    inject_adapters(model, config)
    randomize_adapters(model)
    twin, _ = load_model(alias, seed=0)
    inject_adapters(twin, config)
    randomize_adapters(twin)
    first = logits(model, batch)
    assert torch.equal(first, logits(model, batch))  # eval masks are fixed
    assert torch.equal(first, logits(twin, batch))  # and reproducible from the seed
    other, _ = load_model(alias, seed=0)
    inject_adapters(other, config.model_copy(update={"seed": 4}))
    randomize_adapters(other)
    for name, layer in adapter_layers(other).items():  # same experts and router, other masks only
        layer.load_state_dict(adapter_layers(model)[name].state_dict())
    assert not torch.allclose(first, logits(other, batch))


def test_masks_in_training_only_when_asked(tiny, batch):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.slim(r=4, mask_ratio=0.5, mask_in_training=True, yield_scale=0.0))
    randomize_adapters(model)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, model(**batch).logits)  # fresh masks each step
    for layer in adapter_layers(model).values():
        layer.config = layer.config.model_copy(update={"mask_in_training": False})
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**batch).logits)


def test_clusters_move_in_train_mode_only(tiny, batch):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.slim(r=4))
    layer = next(iter(adapter_layers(model).values()))
    with torch.no_grad():
        model(**batch)
    assert not bool(layer.clusters.initialised)  # eval never learns
    model.train()
    with torch.no_grad():
        model(**batch)
        frozen = {k: v.clone() for k, v in layer.clusters.state_dict().items()}
        model(input_ids=batch["input_ids"].flip(1))
    moved = layer.clusters.state_dict()
    assert bool(moved["initialised"])
    assert not torch.equal(moved["centres"], frozen["centres"])
    assert not torch.equal(moved["variances"], frozen["variances"])
    model.eval()
    before = {k: v.clone() for k, v in moved.items()}
    with torch.no_grad():
        model(input_ids=batch["input_ids"] + 7)
    assert all(torch.equal(before[k], v) for k, v in layer.clusters.state_dict().items())


def test_padding_tokens_do_not_move_clusters(tiny, batch):
    model, alias = tiny
    twin, _ = load_model(alias, seed=0)
    for m in (model, twin):
        inject_adapters(m, AdapterConfig.slim(r=4))
        m.train()
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][1, -1] = 9  # only the padded position differs
    with torch.no_grad():
        model(**batch)
        twin(**other)
    for name, layer in adapter_layers(model).items():
        twin_layer = adapter_layers(twin)[name]
        torch.testing.assert_close(layer.clusters.centres, twin_layer.clusters.centres)


@pytest.mark.parametrize("reduction", ["max", "quantile", "mean"])
def test_shifted_inputs_get_a_higher_identity_share(tiny, reduction):
    """Clusters learned on sequences over 8 tokens; tokens never seen in training are far away."""
    model, _ = tiny
    inject_adapters(model, AdapterConfig.slim(r=4, cluster_momentum=0.5, distance_reduction=reduction))
    generator = torch.Generator().manual_seed(0)
    vocabulary = torch.randint(10, 2000, (8,), generator=generator)

    def in_domain(rows: int) -> torch.Tensor:
        return vocabulary[torch.randint(0, 8, (rows, 16), generator=generator)]

    model.train()
    with torch.no_grad():
        for _ in range(6):
            model(input_ids=in_domain(4))
    near = routing_diagnostics(model, [in_domain(4)])
    far = routing_diagnostics(model, [torch.randint(2000, 40000, (4, 16), generator=generator)])
    assert far["identity_share"] > near["identity_share"] + 0.3
    for name, layer in far["layers"].items():
        assert layer["distance"]["mean"] > near["layers"][name]["distance"]["mean"] + 0.1, name


def test_gradients_reach_only_experts_and_router(tiny, batch):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.slim(r=4, num_experts=3, top_k=2))
    randomize_adapters(model, scale=0.1)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    (out.loss + adapter_regularization(model)).backward()
    trainable = {id(p) for p in trainable_parameters(model)}
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if id(p) in trainable}
    assert names == {"lora_A", "lora_B", "router"}
    for name, parameter in model.named_parameters():
        if id(parameter) in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_l1_and_balance_on_hand_examples():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(3, 2, bias=False))
    config = AdapterConfig.moe_lora(r=1, num_experts=2, top_k=1, target_modules=["proj"], l1_weight=1.0)
    inject_adapters(model, config)
    layer = model.proj
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[[1.0, -1.0, 0.0]], [[2.0, 0.0, 0.0]]]))  # |A|_1 = 4
        layer.lora_B.copy_(torch.tensor([[[1.0], [0.0]], [[-3.0], [1.0]]]))  # |B|_1 = 5
    # sum_e |B_e|_1 / (r d_out) + |A_e|_1 / (r d_in) = 5 / 2 + 4 / 3
    assert layer.l1_penalty().item() == pytest.approx(5 / 2 + 4 / 3)
    # two tokens, both choose expert 0; router probabilities (0.5, 0.5) and (e/(1+e), 1/(1+e))
    logits = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    chosen = torch.tensor([[0], [0]])
    p0 = (0.5 + torch.e / (1 + torch.e)) / 2
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert layer._balance_term(logits, weights, chosen, None, 1).item() == pytest.approx(
        2 * (1.0 * p0), rel=1e-6
    )


def test_regularization_combines_l1_and_balance(tiny, batch):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.slim(r=4, l1_weight=0.5, balance_weight=0.25))
    randomize_adapters(model)
    model.train()
    model(**batch)
    layers = list(adapter_layers(model).values())
    l1 = sum(layer.l1_penalty() for layer in layers) * 0.5
    balance = torch.stack([layer.balance_loss() for layer in layers]).mean() * 0.25
    torch.testing.assert_close(adapter_regularization(model), l1 + balance)
    zero = AdapterConfig.slim(r=4, l1_weight=0.0, balance_weight=0.0)
    for layer in layers:
        layer.config = zero
    assert adapter_regularization(model).item() == 0.0


def test_slim_save_load_identical_logits(tiny, batch, tmp_path):
    model, alias = tiny
    inject_adapters(model, AdapterConfig.slim(r=4, num_clusters=2))
    randomize_adapters(model, scale=0.3)
    model.train()
    with torch.no_grad():
        model(**batch)  # learn cluster state, which must be saved too
    model.eval()
    expected = logits(model, batch)
    folder = save_adapter(model, tmp_path / "slim", base_model=alias)
    assert not (folder / "adapter_config.json").exists()  # a mixture is not a PEFT LoRA
    fresh, _ = load_model(alias, seed=0)
    load_adapter(fresh, folder, base_model=alias)
    assert all(isinstance(layer, MixtureLinear) for layer in adapter_layers(fresh).values())
    assert torch.equal(logits(fresh, batch), expected)


def test_mixtures_cannot_merge_or_give_lora_factors(tiny):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.slim(r=4))
    with pytest.raises(InputError, match="does not reduce to one weight"):
        merge_adapters(model)
    with pytest.raises(InputError, match="not lora"):
        lora_factors(model)


def test_moe_lora_preset_has_no_identity_yielding_or_masking():
    config = AdapterConfig.moe_lora()
    assert (config.num_experts, config.num_identity_experts, config.top_k) == (8, 0, 2)
    assert config.yield_scale == 0 and config.mask_ratio == 0 and not config.uses_clustering
    slim = AdapterConfig.slim()
    assert (slim.num_experts, slim.num_identity_experts, slim.top_k) == (8, 2, 2) and slim.uses_clustering
    with pytest.raises(InputError, match="top_k: 5 is more than the 4 experts"):
        AdapterConfig.slim(num_experts=2, num_identity_experts=2, top_k=5)


@pytest.mark.parametrize("top_p", [None, 0.5], ids=["top_k", "top_p"])
def test_sparse_and_dense_expert_paths_agree_with_gradients(top_p):
    """Many tokens run each expert on its routed tokens only; few tokens one dense product."""
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(24, 40))
    config = AdapterConfig.slim(r=4, target_modules=["proj"], num_experts=5, top_k=3, top_p=top_p)
    inject_adapters(model, config)
    randomize_adapters(model, scale=1.0)
    layer = model.proj
    x = torch.randn(100, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights, _, chosen, _ = layer.route(x, None)
    a, b, scales = layer.expert_factors()
    dense = layer._experts_dense(x, weights, a, b, scales)
    sparse = layer._experts_sparse(x, weights, chosen, a, b, scales)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-4)
    inputs = [layer.lora_A, layer.lora_B, layer.router, x]
    dense_grads = torch.autograd.grad(dense.square().sum(), inputs, retain_graph=True)
    sparse_grads = torch.autograd.grad(sparse.square().sum(), inputs)
    for name, d, s in zip(["A", "B", "router", "x"], dense_grads, sparse_grads):
        assert (s - d).abs().max() <= 1e-5 * d.abs().max(), name  # equal up to float32 summation order


@pytest.mark.parametrize(
    "config",
    [
        AdapterConfig.slim(r=4, mask_ratio=0.5, merge_scale=0.8),
        AdapterConfig.slim(
            r=4, distance_reduction="quantile", distance_calibration="zscore", yield_scale=3.0
        ),
        AdapterConfig.slim(r=4, distance_reduction="mean", distance_calibration="none"),
        AdapterConfig.moe_lora(r=4),
        AdapterConfig.moe_lora(r=4, top_k=8, top_p=0.6),
        AdapterConfig.moe_lora(r=4, top_k=8, balance_form="localized"),
    ],
    ids=["slim-masked", "slim-quantile-zscore", "slim-mean-none", "moe_lora", "mixlora_dy", "loramoe"],
)
def test_folded_inference_path_equals_the_general_path(batch, config):
    model, _ = load_model("tiny-llama", seed=0)
    inject_adapters(model, config)
    randomize_adapters(model, scale=0.5)
    model.train()
    with torch.no_grad():
        model(**batch)  # learn cluster state
    model.eval()
    with torch.enable_grad():  # autograd on: the general path
        general = model(**batch).logits.detach()
    with torch.no_grad():  # the folded path (inference.py)
        folded = model(**batch).logits
    torch.testing.assert_close(folded, general, atol=1e-5, rtol=1e-5)
    for position in range(batch["input_ids"].shape[1]):  # one token: only its chosen experts run
        one = {"input_ids": batch["input_ids"][:1, position : position + 1]}
        with torch.enable_grad():
            general = model(**one).logits.detach()
        with torch.no_grad():  # float32 summation order: all 8 experts on a token differ by ~2e-5
            torch.testing.assert_close(model(**one).logits, general, atol=5e-5, rtol=1e-5)


def test_diagnostics_count_only_real_and_selected_tokens(tiny, batch):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.slim(r=4, num_experts=3, top_k=2))
    report = routing_diagnostics(model, [batch])
    assert report["tokens"] == 23  # 2 x 12 tokens, one padded
    layer = next(iter(report["layers"].values()))
    assert sum(layer["expert_load"]) == pytest.approx(1.0) and len(layer["expert_load"]) == 5
    selected = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    selected[:, :3] = True
    assert routing_diagnostics(model, [dict(batch, statistics_mask=selected)])["tokens"] == 6
    with pytest.raises(InputError, match="no moe_lora or slim adapters"):
        routing_diagnostics(load_model("tiny-llama")[0], [batch])


def test_separation_auc_counts_pairs_and_ties_half():
    from forgetless.adapters import separation_auc

    generator = torch.Generator().manual_seed(0)
    negative = torch.randint(0, 6, (40,), generator=generator).float()  # many exact ties
    positive = torch.randint(2, 8, (30,), generator=generator).float()
    pairs = (positive[:, None] > negative[None, :]).float() + 0.5 * (
        positive[:, None] == negative[None, :]
    ).float()
    assert separation_auc(negative, positive) == pytest.approx(float(pairs.double().mean()), abs=1e-12)
    assert separation_auc(torch.zeros(3), torch.ones(2)) == 1.0
    assert separation_auc(torch.ones(4), torch.ones(5)) == 0.5
    with pytest.raises(ValueError, match="at least one value"):
        separation_auc(torch.zeros(0), torch.ones(2))
