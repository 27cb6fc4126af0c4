"""The stage hooks: order, what a StageContext and a TrainBatch hold, state between stages, resume."""

from __future__ import annotations

import pytest
import torch
from strategy_helpers import run_killed_at_step

from forgetless.errors import InputError
from forgetless.strategies import STRATEGIES, register_strategy
from forgetless.strategies.context import STATE_DIR
from forgetless.strategies.sequential_lora import SequentialLoRA
from forgetless.training import run_strategy
from forgetless.training.loss import labelled_logits

CALLS: list[tuple] = []


class Recorder(SequentialLoRA):
    """Sequential LoRA that records every hook call and keeps a per-stage state."""

    def before_training(self, context) -> None:
        earlier = [context.load_state(i) for i in range(context.stage)]
        CALLS.append(("before", context.stage, context.resumed, len(context.examples), earlier))
        self.steps_seen = torch.zeros(1)  # restored from a checkpoint after this hook on resume

    def extra_loss(self, model, batch=None):
        with torch.no_grad():
            again = labelled_logits(
                model, batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.keep
            )
        CALLS.append(("extra", batch.logits.shape, bool(torch.allclose(again, batch.logits, atol=1e-5))))
        return batch.logits.float().pow(2).mean() * 0  # in the graph, changes nothing

    def before_step(self, model, step) -> None:
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        CALLS.append(("step", all(g is not None for g in grads), step))
        self.steps_seen += 1

    def checkpoint_tensors(self):
        return {"steps_seen": self.steps_seen}

    def after_training(self, context) -> None:
        CALLS.append(("after", context.stage, int(self.steps_seen)))
        context.save_state({"seen": torch.tensor([float(context.stage)])}, {"stage": context.stage})


@pytest.fixture()
def recorder():
    CALLS.clear()
    register_strategy("test_recorder")(Recorder)
    yield "test_recorder"
    STRATEGIES._entries.pop("test_recorder")


def test_hooks_run_in_order_and_state_reaches_later_stages(recorder, two_tasks, fast_config, tmp_path):
    results = run_strategy(recorder, {"r": 4}, "tiny-llama", two_tasks, fast_config, tmp_path)
    kinds = [call[0] for call in CALLS]
    # stage 0: before, 3 x (extra, step), after; then stage 1 the same
    assert kinds == (["before"] + ["extra", "step"] * 3 + ["after"]) * 2
    before = [call for call in CALLS if call[0] == "before"]
    assert before[0][1:4] == (0, False, 12) and before[0][4] == []
    stage_one_earlier = before[1][4]
    assert len(stage_one_earlier) == 1 and stage_one_earlier[0][1] == {"stage": 0}
    assert torch.equal(stage_one_earlier[0][0]["seen"], torch.tensor([0.0]))
    extras = [call for call in CALLS if call[0] == "extra"]
    assert all(call[2] for call in extras)  # the batch's logits are the model's at its answer positions
    assert all(call[1][0] > 0 and call[1][1] > 100 for call in extras)
    steps = [call for call in CALLS if call[0] == "step"]
    assert all(call[1] for call in steps) and [call[2] for call in steps] == [0, 1, 2] * 2
    for result in results:
        assert (result.folder / STATE_DIR / "state.safetensors").is_file()


def test_finished_stages_run_no_hook(recorder, two_tasks, fast_config, tmp_path):
    run_strategy(recorder, {"r": 4}, "tiny-llama", two_tasks, fast_config, tmp_path)
    CALLS.clear()
    results = run_strategy(recorder, {"r": 4}, "tiny-llama", two_tasks, fast_config, tmp_path)
    assert CALLS == [] and all(r.cached for r in results)


def test_resumed_stage_says_so_and_ends_like_an_uninterrupted_one(
    recorder, two_tasks, fast_config, tmp_path, monkeypatch
):
    config = {**fast_config, "checkpoint_every": 1}
    straight = run_strategy(recorder, {"r": 4}, "tiny-llama", two_tasks[:1], config, tmp_path / "a")
    run_killed_at_step(
        monkeypatch,
        3,
        lambda: run_strategy(recorder, {"r": 4}, "tiny-llama", two_tasks[:1], config, tmp_path / "b"),
    )
    CALLS.clear()
    resumed = run_strategy(recorder, {"r": 4}, "tiny-llama", two_tasks[:1], config, tmp_path / "b")
    assert [call for call in CALLS if call[0] == "before"][0][2] is True
    # the strategy's own mid-stage tensor came back from the checkpoint: 3 steps in all, not 1
    assert [call[2] for call in CALLS if call[0] == "after"] == [3]
    assert resumed[0].summary["final_loss"] == pytest.approx(straight[0].summary["final_loss"], abs=1e-6)


def test_missing_earlier_state_is_one_clear_error(recorder, two_tasks, fast_config, tmp_path):
    run_strategy("sequential_lora", {"r": 4}, "tiny-llama", two_tasks[:1], fast_config, tmp_path)
    # stage 0 was trained by a strategy that keeps no state: a later stage that needs it says which
    from forgetless.strategies.context import StageContext

    context = StageContext(
        stage=1, tasks=two_tasks, model=torch.nn.Linear(2, 2), tokenizer=None, examples=[], pad_id=0,
        seed=0, folder=tmp_path / "stage-1-beta", previous=[tmp_path / "stage-0-alpha"],
    )  # fmt: skip
    with pytest.raises(InputError, match="stage 0 saved no strategy state"):
        context.load_state(0)
