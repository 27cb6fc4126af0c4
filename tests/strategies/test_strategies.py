"""Per-strategy behaviour: O-LoRA's penalty, how each stage starts from the last, DoRA through PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from forgetless import load_model
from forgetless.adapters import lora_factors
from forgetless.errors import InputError
from forgetless.strategies import ModelSource, make_strategy
from forgetless.strategies.olora import orthogonality_penalty
from forgetless.training import load_stage, run_strategy


def test_orthogonality_penalty_hand_example():
    # A_1 = [[1, 0, 0]], A_2 = [[0, 2, 0]] (earlier, stacked); A_t = [[1, 1, 0], [0, 0, 3]]
    previous = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    current = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    # A_1 A_t^T = [1, 0] -> 1; A_2 A_t^T = [2, 0] -> 4; total 5
    assert orthogonality_penalty(previous, current).item() == pytest.approx(5.0)
    assert orthogonality_penalty(previous, torch.tensor([[0.0, 0.0, 1.0]])).item() == 0.0


def test_olora_penalty_uses_every_earlier_adapter(two_tasks, fast_config, tmp_path):
    results = run_strategy("olora", {"r": 4, "lambda": 0.5}, "tiny-llama", two_tasks, fast_config, tmp_path)
    strategy = make_strategy("olora", {"r": 4, "lambda": 0.5})
    source = ModelSource("tiny-llama")
    first = strategy.build(0, source, [], seed=0)
    assert strategy.extra_loss(first) is None  # nothing to be orthogonal to yet

    model = strategy.build(1, source, [results[0].artifact], seed=0)
    saved = load_model("tiny-llama")[0]
    from forgetless.adapters import load_adapter

    earlier = lora_factors(load_adapter(saved, results[0].artifact))
    current = lora_factors(model)
    assert earlier.keys() == current.keys() and len(current) == 6  # gate/up/down x 2 layers
    expected = sum(((earlier[m][0] @ current[m][0].T) ** 2).sum() for m in current)
    assert strategy.extra_loss(model).item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert expected.item() > 0
    # gradient reaches the new A only
    strategy.extra_loss(model).backward()
    assert all(current[m][0].grad is not None and current[m][0].grad.abs().sum() > 0 for m in current)
    # the metrics log records the extra term from stage 2 on
    lines = [json.loads(x) for x in (results[1].folder / "metrics.jsonl").read_text().splitlines()]
    assert all(line["extra_loss"] > 0 for line in lines)


def test_olora_earlier_adapters_stay_active(two_tasks, fast_config, tmp_path):
    """Stage 2's model starts as base + merged stage-1 adapter (frozen and active)."""
    results = run_strategy("olora", {"r": 4}, "tiny-llama", two_tasks[:1], fast_config, tmp_path)
    strategy = make_strategy("olora", {"r": 4})
    source = ModelSource("tiny-llama")
    stage_two_start = strategy.build(1, source, [results[0].artifact], seed=0)
    after_stage_one, tokenizer = load_stage(results[0])
    batch = tokenizer(["alpha item 2?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(stage_two_start(**batch).logits, after_stage_one(**batch).logits, atol=1e-5)
    trainable = {name for name, p in stage_two_start.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_sequential_lora_merges_each_stage_into_the_base(two_tasks, fast_config, tmp_path):
    results = run_strategy("sequential_lora", {"r": 4}, "tiny-llama", two_tasks, fast_config, tmp_path)
    from forgetless.adapters import load_adapter

    base = load_model("tiny-llama")[0]
    deltas = []
    for result in results:
        adapted = load_adapter(load_model("tiny-llama")[0], result.artifact)
        deltas.append({name: (b @ a) * s for name, (a, b, s) in lora_factors(adapted).items()})
    final, _ = load_stage(results[1])
    name = "model.layers.1.mlp.down_proj"
    expected = base.get_submodule(name).weight + deltas[0][name] + deltas[1][name]
    assert torch.allclose(final.get_submodule(name).weight, expected, atol=1e-6)
    assert all(d[name].abs().sum() > 0 for d in deltas)


def test_sequential_lora_keep_adapter_continues_one_adapter(two_tasks, fast_config, tmp_path):
    params = {"r": 4, "keep_adapter": True}
    results = run_strategy("sequential_lora", params, "tiny-llama", two_tasks, fast_config, tmp_path)
    strategy = make_strategy("sequential_lora", params)
    start = strategy.build(1, ModelSource("tiny-llama"), [results[0].artifact], seed=0)
    after_one, _ = load_stage(results[0])
    ours, theirs = lora_factors(start), lora_factors(after_one)
    assert all(torch.equal(ours[m][1], theirs[m][1]) for m in ours)  # same B: training continues
    after_two, _ = load_stage(results[1])
    assert not all(torch.equal(lora_factors(after_two)[m][1], theirs[m][1]) for m in ours)


def test_sequential_fft_continues_from_the_previous_model(two_tasks, fast_config, tmp_path):
    results = run_strategy("sequential_fft", {}, "tiny-llama", two_tasks, fast_config, tmp_path)
    strategy = make_strategy("sequential_fft")
    assert strategy.default_lr == 2e-5
    start = strategy.build(1, ModelSource("tiny-llama"), [results[0].artifact], seed=0)
    saved = load_stage(results[0])[0].state_dict()
    assert all(torch.equal(tensor, saved[key]) for key, tensor in start.state_dict().items())
    assert all(p.requires_grad for p in start.parameters())
    assert (results[1].artifact / "config.json").exists() and (
        results[1].artifact / "tokenizer.json"
    ).exists()


def test_joint_trains_every_stage_from_the_base(two_tasks, fast_config, tmp_path):
    results = run_strategy(
        "joint", {"r": 4}, "tiny-llama", two_tasks, fast_config, tmp_path, setting="fully_cooperative"
    )
    assert results[1].trained_on == {"alpha": 12, "beta": 12}  # beta upsampled to alpha's size
    start = make_strategy("joint", {"r": 4}).build(
        1, ModelSource("tiny-llama"), [results[0].artifact], seed=0
    )
    assert all(b.abs().sum() == 0 for _, (a, b, s) in lora_factors(start).items())  # a fresh adapter


def test_dora_saves_a_peft_dora_adapter(two_tasks, fast_config, tmp_path):
    from peft import PeftModel

    results = run_strategy("dora", {"r": 4}, "tiny-llama", two_tasks[:1], fast_config, tmp_path)
    config = json.loads((results[0].artifact / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4
    base, tokenizer = load_model("tiny-llama")
    peft_model = PeftModel.from_pretrained(base, str(results[0].artifact))
    ours, _ = load_stage(results[0])
    batch = tokenizer(["alpha item 2?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, ours(**batch).logits, atol=1e-5)


def test_replay_and_joint_modes_fft_save_full_models(two_tasks, fast_config, tmp_path):
    results = run_strategy(
        "replay", {"mode": "fft", "fraction": 0.5}, "tiny-llama", two_tasks, fast_config, tmp_path,
        setting="fully_cooperative",
    )  # fmt: skip
    assert [r.artifact.name for r in results] == ["model", "model"]
    assert results[1].trained_on == {"beta": 8, "alpha": 4}


@pytest.mark.parametrize("name", ["slim", "moe_lora"])
def test_mixture_strategies_continue_one_adapter_with_regularization(name, two_tasks, fast_config, tmp_path):
    from forgetless.adapters import adapter_layers, adapter_state_dict

    params = {"r": 4, "num_experts": 2, "top_k": 1}
    results = run_strategy(name, params, "tiny-llama", two_tasks, fast_config, tmp_path)
    strategy = make_strategy(name, params)
    start = strategy.build(1, ModelSource("tiny-llama"), [results[0].artifact], seed=0)
    assert {layer.kind for layer in adapter_layers(start).values()} == {name}
    after_one = adapter_state_dict(load_stage(results[0])[0])
    state = adapter_state_dict(start)
    if name == "slim":  # the sample gate keeps stage 1's prompt statistics apart, frozen
        frozen = {".clusters.": ".earlier_gates.0.clusters.", ".gate_moments.": ".earlier_gates.0.moments."}
        for old, new in frozen.items():
            after_one |= {k.replace(old, new): v for k, v in after_one.items() if old in k}
        assert all(int(v) == 0 for k, v in state.items() if k.endswith(".gate_moments.batches"))
        state = {k: v for k, v in state.items() if ".clusters." not in k and ".gate_moments." not in k}
        after_one = {
            k: v for k, v in after_one.items() if ".clusters." not in k and ".gate_moments." not in k
        }
        if next(iter(adapter_layers(start).values())).config.stage_experts == "per_task":
            # and stage 1's experts and router, frozen beside the trainable copy that continues
            for part in ("lora_A", "lora_B", "router", "expert_scaling"):
                after_one |= {
                    k.replace(f".{part}", f".earlier_experts.0.{part}"): v
                    for k, v in list(after_one.items())
                    if k.endswith(f".{part}")
                }
    assert state.keys() == after_one.keys()
    assert all(torch.equal(state[key], after_one[key]) for key in state)  # buffers included
    tokenizer = ModelSource("tiny-llama").tokenizer
    start.train()
    start(**tokenizer(["alpha item 2?"], return_tensors="pt"))
    assert strategy.extra_loss(start).item() > 0  # L1 (slim) and balance losses of the last forward
    lines = [json.loads(x) for x in (results[0].folder / "metrics.jsonl").read_text().splitlines()]
    assert all(line["extra_loss"] > 0 for line in lines)


def test_eval_and_serve_take_a_stage_folder_as_the_model(two_tasks, fast_config, tmp_path):
    from forgetless.evaluation.run import load_model_and_adapter

    results = run_strategy(
        "slim", {"r": 4, "num_experts": 2, "top_k": 1}, "tiny-llama", two_tasks, fast_config, tmp_path
    )
    model, tokenizer = load_model_and_adapter(str(results[1].folder))
    reference, _ = load_stage(results[1])
    batch = tokenizer(["alpha item 2?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
    with pytest.raises(InputError, match="brings its own adapter"):
        load_model_and_adapter(str(results[1].folder), adapter=str(results[1].folder / "adapter"))


def test_gated_lora_is_one_lora_per_stage_behind_the_gate(two_tasks, fast_config, tmp_path):
    from forgetless.adapters import adapter_layers

    results = run_strategy("gated_lora", {"r": 4}, "tiny-llama", two_tasks, fast_config, tmp_path)
    final, _ = load_stage(results[1])
    layers = list(adapter_layers(final).values())
    config = layers[0].config
    assert (config.num_experts, config.num_identity_experts, config.top_k, config.r) == (1, 0, 1, 4)
    assert config.yield_pooling == "sample" and config.stage_experts == "per_task"
    assert config.balance_weight == 0 and config.l1_weight == 0 and config.mask_ratio == 0
    # stage 0's LoRA is kept frozen beside stage 1's, and differs from it
    assert all(len(layer.earlier_experts) == 1 for layer in layers)
    assert any(not torch.equal(layer.earlier_experts[0].lora_B, layer.lora_B) for layer in layers)
    # a param overrides the variant's default
    override = make_strategy("gated_lora", {"yield_threshold": 5.0}).engine.config(0)
    assert override.yield_threshold == 5.0 and override.num_experts == 1
