"""I-LoRA: the EMA by hand, the saved adapter is the slow learner, the consistency term, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from strategy_helpers import run_killed_at_step

from forgetless import load_model
from forgetless.adapters import load_adapter
from forgetless.strategies import STRATEGIES, ModelSource, make_strategy, register_strategy
from forgetless.strategies.context import STATE_DIR, snapshot, trainable_named
from forgetless.strategies.ilora import FAST, ILoRA, hidden_consistency, interpolate
from forgetless.training import run_strategy

SETTING = "fully_cooperative"


def _adapter(artifact) -> dict[str, torch.Tensor]:
    return snapshot(trainable_named(load_adapter(load_model("tiny-llama")[0], artifact)))


def _fast(folder) -> dict[str, torch.Tensor]:
    tensors = load_file(folder / STATE_DIR / "state.safetensors")
    return {name[len(FAST) :]: tensor for name, tensor in tensors.items()}


def _close(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(
        torch.allclose(first[k], second[k], atol=1e-6) for k in first
    )


def test_interpolation_by_hand():
    slow0 = {"w": torch.tensor([1.0, -2.0, 0.5])}
    fast = {"w": torch.tensor([3.0, 2.0, 0.5])}
    slow = {"w": slow0["w"].clone()}
    interpolate(slow, fast, 0.9)
    # 0.9 * slow0 + 0.1 * fast
    assert torch.allclose(slow["w"], torch.tensor([1.2, -1.6, 0.5]))
    assert torch.equal(fast["w"], torch.tensor([3.0, 2.0, 0.5]))  # the fast learner is untouched


class Recorder(ILoRA):
    """I-LoRA that records the slow learner it starts from and the fast learner at every step."""

    slow0: dict = {}
    fasts: list = []

    def before_training(self, context) -> None:
        super().before_training(context)
        Recorder.slow0, Recorder.fasts = snapshot(self._slow), []

    def before_step(self, model, step) -> None:
        Recorder.fasts.append(snapshot(trainable_named(model)))  # after `step` optimizer steps
        super().before_step(model, step)

    def after_training(self, context) -> None:
        Recorder.fasts.append(snapshot(trainable_named(context.model)))
        super().after_training(context)


@pytest.fixture()
def recorder():
    register_strategy("test_ilora_recorder")(Recorder)
    yield "test_ilora_recorder"
    STRATEGIES._entries.pop("test_ilora_recorder")


def test_saved_adapter_is_the_slow_learner(recorder, two_tasks, fast_config, tmp_path):
    params = {"r": 4, "interpolation": 0.9}
    results = run_strategy(recorder, params, "tiny-llama", two_tasks[:1], fast_config, tmp_path, SETTING)
    assert len(Recorder.fasts) == 4  # before steps 0, 1, 2 and at the end
    expected = {name: tensor.clone() for name, tensor in Recorder.slow0.items()}
    for fast in Recorder.fasts[1:]:  # one EMA step after each of the 3 optimizer steps
        for name, tensor in expected.items():
            expected[name] = 0.9 * tensor + 0.1 * fast[name]
    saved, final_fast = _adapter(results[0].artifact), Recorder.fasts[-1]
    assert _close(saved, expected)
    assert _close(_fast(results[0].folder), final_fast)  # the fast learner is kept in the state
    # the slow learner lags behind the fast one (lora_B starts at zero and moves)
    assert max((saved[k] - final_fast[k]).abs().max().item() for k in saved) > 1e-3


def test_consistency_is_zero_for_equal_learners_and_positive_after():
    strategy = make_strategy("ilora", {"r": 4})
    model = strategy.build(0, ModelSource("tiny-llama"), [], seed=0)
    model.train()
    slow = snapshot(trainable_named(model))
    inputs = {
        "input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }
    assert hidden_consistency(model, slow, inputs).item() == 0.0
    named = trainable_named(model)
    with torch.no_grad():  # a fresh adapter has B = 0: move B so the fast learner differs
        for name, param in named.items():
            if name.endswith("lora_B"):
                param.add_(0.05)
    loss = hidden_consistency(model, slow, inputs)
    assert loss.item() > 0
    loss.backward()
    assert all(param.grad is not None for param in named.values())
    assert any(param.grad.abs().sum() > 0 for param in named.values())


def test_consistency_only_on_replayed_rows(two_tasks, fast_config, tmp_path):
    results = run_strategy("ilora", {"r": 4}, "tiny-llama", two_tasks, fast_config, tmp_path, SETTING)

    def extras(result):
        lines = (result.folder / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["extra_loss"] for line in lines]

    assert extras(results[0]) == [0.0, 0.0, 0.0]  # stage 0 replays nothing
    # stage 1: 8 beta examples and 1 replayed alpha example, one epoch of 3 steps: one step has it
    assert results[1].trained_on == {"beta": 8, "alpha": 1}
    assert sum(value > 0 for value in extras(results[1])) == 1


def test_resumed_stage_ends_like_an_uninterrupted_one(two_tasks, fast_config, tmp_path, monkeypatch):
    config = {**fast_config, "checkpoint_every": 1}
    params = {"r": 4, "interpolation": 0.9}
    straight = run_strategy("ilora", params, "tiny-llama", two_tasks, config, tmp_path / "a", SETTING)
    run_killed_at_step(
        monkeypatch,
        5,
        lambda: run_strategy("ilora", params, "tiny-llama", two_tasks, config, tmp_path / "b", SETTING),
    )
    assert (tmp_path / "b" / "stage-1-beta" / "checkpoint").is_dir()
    resumed = run_strategy("ilora", params, "tiny-llama", two_tasks, config, tmp_path / "b", SETTING)
    assert resumed[0].cached and resumed[1].summary["resumed_from_step"] == 1
    for one, two in zip(straight, resumed):
        assert _close(_adapter(one.artifact), _adapter(two.artifact))
        assert _close(_fast(one.folder), _fast(two.folder))
