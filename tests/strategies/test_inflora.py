"""InfLoRA: the designed A against hand examples, its orthogonality to the earlier basis, A frozen
while B trains, the basis growth, and an update that spares the earlier task's inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from strategy_helpers import run_killed_at_step

from forgetless import load_model
from forgetless.adapters import load_adapter, lora_factors
from forgetless.errors import InputError
from forgetless.strategies import ModelSource, make_strategy
from forgetless.strategies.context import STATE_DIR, StageContext
from forgetless.strategies.inflora import (
    ROW_NORM,
    design_down_projection,
    grow_basis,
    input_covariances,
)
from forgetless.training import load_stage, run_strategy
from forgetless.training.config import TrainConfig
from forgetless.training.runner import _encode

PARAMS = {"r": 4}


def basis(folder) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(folder / STATE_DIR / "state.safetensors")
    meta = json.loads((folder / STATE_DIR / "state.json").read_text())
    return {key.removeprefix("basis."): value.double() for key, value in tensors.items()}, meta


def saved_factors(artifact) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    factors = lora_factors(load_adapter(load_model("tiny-llama")[0], artifact))
    return {name: (a.detach(), b.detach(), s) for name, (a, b, s) in factors.items()}


def context_for(stage, model, tasks, task, config, previous=()) -> StageContext:
    tokenizer = ModelSource("tiny-llama").tokenizer
    examples = _encode([(task, list(task.train))], tokenizer, TrainConfig.coerce(config))[0]
    return StageContext(
        stage=stage, tasks=tasks, model=model, tokenizer=tokenizer, examples=examples,
        pad_id=tokenizer.pad_token_id, seed=0, previous=list(previous),
    )  # fmt: skip


def test_basis_grows_until_the_threshold_of_energy():
    covariance = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    first = grow_basis(None, covariance, 0.6)  # 0.4 < 0.6 <= 0.4 + 0.3: two directions
    assert torch.allclose(first.abs(), torch.eye(4, dtype=torch.float64)[:, :2])
    # the old basis explains 1/4; e4 adds 3/4
    grown = grow_basis(first, torch.diag(torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=torch.float64)), 0.6)
    assert grown.shape == (4, 3) and torch.equal(grown[:, :2], first)
    assert torch.allclose(grown[:, 2].abs(), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    # already 3/4 explained: nothing added
    same = grow_basis(first, torch.diag(torch.tensor([3.0, 0.0, 0.0, 1.0], dtype=torch.float64)), 0.6)
    assert torch.equal(same, first)


def test_design_takes_the_top_directions_outside_the_basis():
    covariance = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    e = torch.eye(4, dtype=torch.float64)
    rows = design_down_projection(covariance, e[:, :1], rank=2)  # e1 is taken: e2, e3
    assert torch.allclose(rows.abs(), e[1:3] * ROW_NORM)
    rows = design_down_projection(covariance, e[:, :2], rank=4)  # only e3, e4 remain: zero rows after
    assert torch.allclose(rows[:2].abs(), e[2:] * ROW_NORM) and torch.equal(rows[2:], torch.zeros(2, 4))
    plain = design_down_projection(covariance, None, rank=1)
    assert torch.allclose(plain.abs(), e[:1] * ROW_NORM)


def test_threshold_is_validated():
    assert make_strategy("inflora").params.threshold == 0.95
    with pytest.raises(InputError, match="threshold"):
        make_strategy("inflora", {"threshold": 1.0})


def test_designed_a_is_orthogonal_to_the_earlier_basis_which_grows(two_tasks, fast_config, tmp_path):
    results = run_strategy("inflora", PARAMS, "tiny-llama", two_tasks, fast_config, tmp_path)
    first, meta0 = basis(results[0].folder)
    second, meta1 = basis(results[1].folder)
    assert meta0["threshold"] == 0.95 and len(first) == 6  # gate/up/down x 2 layers
    for stage, factors in enumerate(saved_factors(r.artifact) for r in results):
        for name, (a, _, _) in factors.items():
            gram = a.double() @ a.double().T  # rows orthogonal, of norm ROW_NORM
            assert torch.allclose(gram, torch.eye(4, dtype=torch.float64) * ROW_NORM**2, atol=1e-6), name
            if stage == 1:
                assert (a.double() @ first[name]).abs().max() < 1e-6, name  # ||A M|| ~ 0
    for name, old in first.items():
        new = second[name]
        assert old.shape[1] <= new.shape[1] == meta1["dims"][name] <= new.shape[0]
        assert torch.allclose(new[:, : old.shape[1]], old)  # the earlier directions are kept
        assert torch.allclose(new.T @ new, torch.eye(new.shape[1], dtype=torch.float64), atol=1e-5)
    assert sum(second[n].shape[1] for n in second) > sum(first[n].shape[1] for n in first)


def test_a_is_designed_then_frozen_and_only_b_trains(two_tasks, fast_config, tmp_path):
    results = run_strategy("inflora", PARAMS, "tiny-llama", two_tasks, fast_config, tmp_path)
    strategy = make_strategy("inflora", PARAMS)
    model = strategy.build(1, ModelSource("tiny-llama"), [results[0].artifact], seed=0)
    context = context_for(1, model, two_tasks, two_tasks[1], fast_config, [results[0].folder])
    before = {name: a.detach().clone() for name, (a, _, _) in lora_factors(model).items()}
    model.train()
    strategy.before_training(context)
    assert model.training  # the design pass leaves the mode as it found it
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith("lora_B") for name in trainable)
    designed = lora_factors(model)
    trained = saved_factors(results[1].artifact)
    for name, (a, b, _) in designed.items():
        assert not torch.allclose(a, before[name])  # the random init was replaced
        assert torch.allclose(trained[name][0], a, atol=1e-6), name  # training left A as designed
        assert torch.equal(b, torch.zeros_like(b)) and trained[name][1].abs().sum() > 0  # B trained


def _interference(result, old, new) -> list[tuple[float, float]]:
    """Per module, E||dW x||^2 / (||dW||_2^2 E||x||^2) on the old and on the new inputs."""
    values = []
    for name, (a, b, s) in saved_factors(result.artifact).items():
        delta = (b @ a).double() * s
        scale = torch.linalg.matrix_norm(delta, ord=2) ** 2
        pair = [
            float(torch.trace(delta @ c[name] @ delta.T) / (scale * torch.trace(c[name]))) for c in (old, new)
        ]
        values.append((pair[0], pair[1]))
    return values


def test_update_spares_the_earlier_tasks_inputs(two_tasks, fast_config, tmp_path):
    """Stage 1's update acts on stage-0 inputs (seen through the stage-1 starting model) with at
    most 1 - threshold of their energy, and far less than a plain new LoRA's does."""
    inflora = run_strategy("inflora", PARAMS, "tiny-llama", two_tasks, fast_config, tmp_path / "inf")
    plain = run_strategy("sequential_lora", PARAMS, "tiny-llama", two_tasks, fast_config, tmp_path / "seq")
    start, _ = load_stage(inflora[0])  # stage 0 merged: the model stage 1 starts from
    from forgetless.adapters import AdapterConfig, inject_adapters

    inject_adapters(start, AdapterConfig.from_dict({"kind": "lora", **PARAMS}))  # B = 0: no effect
    old = input_covariances(context_for(0, start, two_tasks, two_tasks[0], fast_config))
    new = input_covariances(context_for(0, start, two_tasks, two_tasks[1], fast_config))
    ours, theirs = _interference(inflora[1], old, new), _interference(plain[1], old, new)
    assert all(value <= 1 - 0.95 for value, _ in ours)  # the residual energy bound
    (ours_old, ours_new), (plain_old, plain_new) = (tuple(map(sum, zip(*v))) for v in (ours, theirs))
    assert ours_old < 0.5 * plain_old
    assert ours_old / ours_new < 0.8 * plain_old / plain_new  # relative to the new task's inputs


def test_resumed_stage_designs_the_same_a_and_ends_like_an_uninterrupted_one(
    two_tasks, fast_config, tmp_path, monkeypatch
):
    """A is frozen, so no checkpoint holds it: the resumed stage designs it again, identically."""
    config = {**fast_config, "checkpoint_every": 1}
    straight = run_strategy("inflora", PARAMS, "tiny-llama", two_tasks, config, tmp_path / "a")
    run_killed_at_step(
        monkeypatch,
        5,
        lambda: run_strategy("inflora", PARAMS, "tiny-llama", two_tasks, config, tmp_path / "b"),
    )
    resumed = run_strategy("inflora", PARAMS, "tiny-llama", two_tasks, config, tmp_path / "b")
    assert resumed[0].cached and resumed[1].summary["resumed_from_step"] == 1
    assert resumed[1].summary["final_loss"] == pytest.approx(straight[1].summary["final_loss"], abs=1e-6)
    ours, theirs = saved_factors(resumed[1].artifact), saved_factors(straight[1].artifact)
    for name, (a, b, _) in ours.items():
        assert torch.equal(a, theirs[name][0]) and torch.allclose(b, theirs[name][1], atol=1e-6), name
    for one, two in zip(resumed, straight):  # the same subspaces (as projectors: signs aside)
        for name, m in basis(one.folder)[0].items():
            other = basis(two.folder)[0][name]
            assert torch.allclose(m @ m.T, other @ other.T, atol=1e-5), name
