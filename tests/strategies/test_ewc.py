"""EWC: the Fisher against a hand computation, the online combination, the penalty and its effect."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from forgetless.data.batching import collate
from forgetless.errors import InputError
from forgetless.strategies import ModelSource, make_strategy
from forgetless.strategies.context import STATE_DIR, StageContext, trainable_named
from forgetless.training import load_stage, run_strategy
from forgetless.training.config import TrainConfig
from forgetless.training.runner import _encode

IGNORE = -100


def encoded(task, tokenizer, config):
    return _encode([(task, list(task.train))], tokenizer, TrainConfig.coerce(config))[0]


def hand_fisher(model, examples, pad_id):
    """Mean over examples of the squared gradient of each one's mean answer-token cross-entropy,
    from full logits (no logits_to_keep, no answer_loss)."""
    model.eval()
    named = trainable_named(model)
    total = {name: torch.zeros_like(param) for name, param in named.items()}
    for example in examples:
        batch = collate([example], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE)
        model.zero_grad()
        loss.backward()
        for name, param in named.items():
            total[name] += param.grad.pow(2)
    model.zero_grad()
    return {name: value / len(examples) for name, value in total.items()}


def state(folder):
    tensors = load_file(folder / STATE_DIR / "state.safetensors")
    meta = json.loads((folder / STATE_DIR / "state.json").read_text())
    fisher = {k.removeprefix("fisher."): v for k, v in tensors.items() if k.startswith("fisher.")}
    anchor = {k.removeprefix("anchor."): v for k, v in tensors.items() if k.startswith("anchor.")}
    return fisher, anchor, meta


def context_for(stage, model, tasks, examples, folder, previous=(), pad_id=0):
    return StageContext(
        stage=stage, tasks=tasks, model=model, tokenizer=None, examples=examples, pad_id=pad_id,
        seed=0, folder=folder, previous=list(previous),
    )  # fmt: skip


def test_fisher_is_the_mean_squared_per_example_gradient(two_tasks, fast_config, tmp_path):
    strategy = make_strategy("ewc", {"r": 4, "fisher_examples": 5})
    source = ModelSource("tiny-llama")
    model = strategy.build(0, source, [], seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh LoRA has B = 0 (then A has no gradient): move every factor
        for param in trainable_named(model).values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    examples = encoded(two_tasks[0], source.tokenizer, fast_config)
    pad_id = source.tokenizer.pad_token_id
    context = context_for(0, model, two_tasks, examples, tmp_path / "stage-0-alpha", pad_id=pad_id)
    model.train()
    strategy.after_training(context)
    assert model.training and all(p.grad is None for p in model.parameters())  # no side effects

    fisher, anchor, meta = state(context.folder)
    expected = hand_fisher(model, examples[:5], pad_id)
    named = trainable_named(model)
    assert fisher.keys() == expected.keys() == named.keys() and len(named) == 12  # A, B x 6 modules
    for name in named:
        assert torch.allclose(fisher[name], expected[name], rtol=1e-4, atol=1e-10), name
        assert torch.equal(anchor[name], named[name].detach())
    assert all(expected[name].abs().sum() > 0 for name in named)
    assert meta == {"gamma": 1.0, "examples": 5, "stage": 0}


def test_online_fisher_decays_the_earlier_one(two_tasks, fast_config, tmp_path):
    params = {"r": 4, "gamma": 0.5, "fisher_examples": 4, "lambda": 100.0}
    results = run_strategy("ewc", params, "tiny-llama", two_tasks, fast_config, tmp_path)
    fisher_0, anchor_0, _ = state(results[0].folder)
    fisher_1, anchor_1, meta = state(results[1].folder)
    assert meta == {"gamma": 0.5, "examples": 4, "stage": 1}

    model, tokenizer = load_stage(results[1])
    own = hand_fisher(model, encoded(two_tasks[1], tokenizer, fast_config)[:4], tokenizer.pad_token_id)
    named = trainable_named(model)
    for name in named:
        combined = 0.5 * fisher_0[name] + own[name]
        assert torch.allclose(fisher_1[name], combined, rtol=1e-4, atol=1e-10), name
        assert torch.equal(anchor_1[name], named[name].detach())
    assert any(not torch.equal(anchor_0[name], anchor_1[name]) for name in named)  # one adapter went on
    lines = [json.loads(x) for x in (results[1].folder / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["extra_loss"] == 0.0 and lines[-1]["extra_loss"] > 0  # starts at the anchor


def test_penalty_formula_gradient_and_when_it_is_off(two_tasks, fast_config, tmp_path):
    results = run_strategy(
        "ewc", {"r": 4, "fisher_examples": 3}, "tiny-llama", two_tasks[:1], fast_config, tmp_path
    )
    fisher, anchor, _ = state(results[0].folder)
    source = ModelSource("tiny-llama")
    strategy = make_strategy("ewc", {"r": 4, "lambda": 3.0})
    first = strategy.build(0, source, [], seed=0)
    strategy.before_training(context_for(0, first, two_tasks, [], tmp_path / "s0"))
    assert strategy.extra_loss(first) is None  # stage 0: nothing to hold on to

    model = strategy.build(1, source, [results[0].artifact], seed=0)
    later = context_for(1, model, two_tasks, [], tmp_path / "s1", [results[0].folder])
    strategy.before_training(later)
    assert strategy.extra_loss(model).item() == 0.0  # the continued adapter starts at the anchor
    named = trainable_named(model)
    generator = torch.Generator().manual_seed(1)
    deltas = {name: 0.1 * torch.randn(p.shape, generator=generator) for name, p in named.items()}
    with torch.no_grad():
        for name, param in named.items():
            param.add_(deltas[name])
    expected = 3.0 / 2 * sum((fisher[n] * deltas[n].pow(2)).sum() for n in named)
    penalty = strategy.extra_loss(model)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5) and expected.item() > 0
    penalty.backward()
    for name, param in named.items():
        grad = 3.0 * fisher[name] * (param.detach() - anchor[name])
        assert torch.allclose(param.grad, grad, rtol=1e-5, atol=1e-12), name

    off = make_strategy("ewc", {"r": 4, "lambda": 0})
    off.before_training(later)
    assert off.extra_loss(model) is None


def test_state_for_other_parameters_is_one_clear_error(two_tasks, fast_config, tmp_path):
    results = run_strategy(
        "ewc", {"r": 4, "fisher_examples": 2}, "tiny-llama", two_tasks[:1], fast_config, tmp_path
    )
    strategy = make_strategy("ewc", {"mode": "fft"})
    model = strategy.build(0, ModelSource("tiny-llama"), [], seed=0)
    context = context_for(1, model, two_tasks, [], tmp_path / "s1", [results[0].folder])
    with pytest.raises(InputError, match="holds EWC state with other parameters") as caught:
        strategy.before_training(context)
    assert str(results[0].folder / STATE_DIR) in str(caught.value) and "\n" not in str(caught.value)


def _drift(params, two_tasks, fast_config, folder):
    """Distance of the stage-1 weights from the stage-0 anchor: plain and in the stage-0 Fisher's
    metric, ``sum F (theta - theta*)^2`` (Adam moves every weight by about lr per step whatever
    its gradient's size, so a penalty bounds the plain distance only to ~lr per weight)."""
    results = run_strategy("ewc", params, "tiny-llama", two_tasks, fast_config, folder)
    fisher, anchor, _ = state(results[0].folder)
    model, _ = load_stage(results[1])
    moved = {name: (p.detach() - anchor[name]).pow(2) for name, p in trainable_named(model).items()}
    plain = sum(value.sum().item() for value in moved.values())
    return plain, sum((fisher[name] * value).sum().item() for name, value in moved.items())


def test_a_large_lambda_keeps_the_weights_near_the_anchor(two_tasks, fast_config, tmp_path):
    # 6 steps: the first step of stage 1 starts at the anchor, where the penalty has no gradient
    config = {**fast_config, "max_steps": 6}  # measured: 43x closer in the Fisher metric, 2x plain
    free = _drift({"r": 4, "lambda": 0, "fisher_examples": 8}, two_tasks, config, tmp_path / "a")
    held = _drift({"r": 4, "lambda": 1e8, "fisher_examples": 8}, two_tasks, config, tmp_path / "b")
    assert free[1] > 0 and held[1] < 0.1 * free[1], (free, held)
    assert held[0] < free[0], (free, held)


def test_mode_fft_anchors_every_weight(two_tasks, fast_config, tmp_path):
    params = {"mode": "fft", "fisher_examples": 2}
    results = run_strategy("ewc", params, "tiny-llama", two_tasks, fast_config, tmp_path)
    assert [r.artifact.name for r in results] == ["model", "model"]
    fisher, anchor, meta = state(results[1].folder)
    model, _ = load_stage(results[1])
    names = {name for name, _ in model.named_parameters()}
    assert fisher.keys() == anchor.keys() == names and meta["stage"] == 1
    lines = [json.loads(x) for x in (results[1].folder / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["extra_loss"] > 0
