"""A-GEM: the projection rule, the per-stage episodic memory, projected steps, determinism, resume."""

from __future__ import annotations

import pytest
import torch
from strategy_helpers import run_killed_at_step

from forgetless.data import Example, PromptFormatter, Task
from forgetless.errors import InputError
from forgetless.strategies import STRATEGIES, ModelSource, make_strategy, register_strategy
from forgetless.strategies.agem import AGEM, project
from forgetless.strategies.context import STATE_DIR, StageContext, trainable_named
from forgetless.training import load_stage, run_strategy

PARAMS = {"r": 4, "memory_per_task": 5, "memory_batch": 3}
RECORDS: list[tuple] = []


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    params = trainable_named(model).values()
    return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in params])


class Probe(AGEM):
    """A-GEM that records the loaded memory and, each step, the gradient before and after projection
    with the reference gradient of the same draw (recomputed: eval mode, same seeded batch)."""

    def before_training(self, context) -> None:
        super().before_training(context)
        RECORDS.append(("memory", context.stage, list(self.memory)))

    def before_step(self, model, step) -> None:
        before = _flat_grad(model).clone()
        super().before_step(model, step)
        if self.memory:
            reference = self.reference_gradient(model, step)
            RECORDS.append(("step", self._stage, step, before, _flat_grad(model).clone(), reference))


@pytest.fixture()
def probe():
    RECORDS.clear()
    register_strategy("test_agem_probe")(Probe)
    yield "test_agem_probe"
    STRATEGIES._entries.pop("test_agem_probe")


def _run(name, tasks, config, folder, params=PARAMS):
    return run_strategy(name, params, "tiny-llama", tasks, config, folder, setting="fully_cooperative")


def test_project_hand_example():
    g_ref = torch.tensor([1.0, 0.0, 2.0])
    g = torch.tensor([-1.0, 3.0, 0.0])  # g . g_ref = -1, g_ref . g_ref = 5
    projected = project(g, g_ref)
    assert torch.allclose(projected, torch.tensor([-0.8, 3.0, 0.4]))  # g + 1/5 g_ref
    assert torch.dot(projected, g_ref).abs() < 1e-6
    assert torch.equal(g, torch.tensor([-1.0, 3.0, 0.0]))  # input untouched
    agreeing = torch.tensor([1.0, -5.0, 0.5])  # dot 2 >= 0
    assert torch.equal(project(agreeing, g_ref), agreeing)
    orthogonal = torch.tensor([0.0, 1.0, 0.0])
    assert torch.equal(project(orthogonal, g_ref), orthogonal)
    assert torch.equal(project(g, torch.zeros(3)), g)


def test_each_stage_saves_its_own_memory_and_later_stages_load_it(probe, two_tasks, fast_config, tmp_path):
    results = _run(probe, two_tasks, fast_config, tmp_path)
    memories = {call[1]: call[2] for call in RECORDS if call[0] == "memory"}
    assert memories[0] == []  # nothing to remember before the first stage
    formatter = PromptFormatter(ModelSource("tiny-llama").tokenizer, max_length=512)
    strategy = make_strategy("agem", PARAMS)
    for stage, (task, result) in enumerate(zip(two_tasks, results, strict=True)):
        from safetensors.torch import load_file

        saved = load_file(result.folder / STATE_DIR / "state.safetensors")
        indices = saved["indices"].tolist()
        assert indices == strategy.memory_indices(len(task.train), 0, stage)
        assert len(indices) == 5 == len(set(indices)) and all(0 <= i < len(task.train) for i in indices)
        assert saved["input_ids"].shape[0] == 5  # its own memory only, not the earlier stages' too
        chosen = [formatter.encode(task.train[i]) for i in indices]
        if stage == 0:  # stage 1 loaded exactly stage 0's chosen examples of its own task
            assert memories[1] == chosen
    assert len(memories[1]) == 5


def test_stage_one_steps_never_conflict_with_the_memory_gradient(probe, two_tasks, fast_config, tmp_path):
    alpha = two_tasks[0]
    # alpha's prompts with other answers: stage 1's gradient often opposes the memory's
    answers = [Example(prompt=e.prompt, answer=f"beta word {i * 5 % 7}") for i, e in enumerate(alpha.train)]
    flipped = Task(name="flipped", train=answers, test=answers[:4], metric="exact_match")
    _run(probe, [alpha, flipped], {**fast_config, "max_steps": 6}, tmp_path)
    steps = [call for call in RECORDS if call[0] == "step"]
    assert [call[1:3] for call in steps] == [(1, step) for step in range(6)]  # stage 1 only
    assert any(float(torch.dot(before, reference)) < 0 for *_, before, _, reference in steps)
    for _, _, _, before, after, reference in steps:
        scale = float(after.norm() * reference.norm())
        assert float(torch.dot(after, reference)) >= -1e-5 * scale
        if float(torch.dot(before, reference)) < 0:
            assert abs(float(torch.dot(after, reference))) <= 1e-5 * scale
            assert torch.allclose(after, project(before, reference), atol=1e-7)
        else:
            assert torch.equal(after, before)  # agreeing steps are left exactly as they were


def test_before_step_projects_a_conflicting_gradient_in_place(two_tasks, fast_config, tmp_path):
    results = _run("agem", two_tasks[:1], fast_config, tmp_path)
    strategy = make_strategy("agem", PARAMS)
    source = ModelSource("tiny-llama")
    model = strategy.build(1, source, [results[0].artifact], seed=0)
    context = StageContext(
        stage=1, tasks=two_tasks, model=model, tokenizer=source.tokenizer, examples=[],
        pad_id=source.tokenizer.pad_token_id, seed=0, folder=tmp_path / "stage-1-beta",
        previous=[results[0].folder],
    )  # fmt: skip
    strategy.before_training(context)
    model.train()
    reference = strategy.reference_gradient(model, 7)
    assert reference.norm() > 0 and all(p.grad is None for p in model.parameters())  # no leftovers
    assert model.training and all(m.training for m in model.modules())  # train mode restored
    noise = torch.randn(reference.numel(), generator=torch.Generator().manual_seed(0)) * 1e-3
    offset = 0
    for param in trainable_named(model).values():
        piece = (noise - reference)[offset : offset + param.numel()]
        param.grad = piece.view_as(param).clone()
        offset += param.numel()
    strategy.before_step(model, 7)
    after = _flat_grad(model)
    assert abs(float(torch.dot(after, reference))) <= 1e-5 * float(after.norm() * reference.norm())
    assert torch.allclose(after, project(noise - reference, reference), atol=1e-6)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_same_seed_same_weights_and_resume_ends_like_uninterrupted(
    two_tasks, fast_config, tmp_path, monkeypatch
):
    config = {**fast_config, "checkpoint_every": 1}
    first = _run("agem", two_tasks, config, tmp_path / "a")
    second = _run("agem", two_tasks, config, tmp_path / "b")
    weights = [load_stage(run[1])[0].state_dict() for run in (first, second)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])

    run_killed_at_step(monkeypatch, 5, lambda: _run("agem", two_tasks, config, tmp_path / "c"))
    resumed = _run("agem", two_tasks, config, tmp_path / "c")
    assert resumed[0].cached and resumed[1].summary["resumed_from_step"] == 1
    assert resumed[1].summary["final_loss"] == pytest.approx(first[1].summary["final_loss"], abs=1e-6)


def test_needs_the_fully_cooperative_setting(two_tasks, fast_config, tmp_path):
    with pytest.raises(InputError, match="strategy 'agem' needs setting fully_cooperative"):
        run_strategy("agem", PARAMS, "tiny-llama", two_tasks, fast_config, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was trained


def test_params_are_validated():
    strategy = make_strategy("agem")
    assert (strategy.params.memory_per_task, strategy.params.memory_batch) == (16, 8)
    assert make_strategy("agem", {"mode": "fft"}).produces == "model"
    with pytest.raises(InputError, match="memory_batch"):
        make_strategy("agem", {"memory_batch": 0})
    with pytest.raises(InputError, match="mode is fft"):
        make_strategy("agem", {"mode": "fft", "r": 4})
