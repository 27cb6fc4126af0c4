"""Per-stage experts (``stage_experts: per_task``): each training stage's experts are frozen when
the next stage starts, and a prompt runs the experts of the stage its gate score is nearest to."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from adapter_helpers import randomize_adapters, recompute_greedy, train_gate

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    adapter_layers,
    inject_adapters,
    load_adapter,
    open_gate_task,
    save_adapter,
)
from forgetless.adapters.gate import nearest_task
from forgetless.data.formatting import PromptFormatter
from forgetless.errors import InputError
from forgetless.evaluation.inference import generate_greedy

STAGE_A = ["zorb the glorp twice", "what does kelvar mean", "glorp 3 and 4", "name the zorbian topic"]
STAGE_B = [
    "What is the capital of Peru?",
    "Name the capital of Chile.",
    "Capital of Spain?",
    "Which city rules Japan?",
]


def _two_stages(**fields):
    """A per-stage SLIM model after stage A (kept as a copy) and a stage B whose experts moved."""
    model, tokenizer = load_model("tiny-llama", seed=0)
    config = AdapterConfig.slim(r=4, num_experts=3, stage_experts="per_task", yield_threshold=50.0, **fields)
    inject_adapters(model, config, tokenizer=tokenizer)
    randomize_adapters(model, seed=3, scale=0.3)
    formatter = PromptFormatter(tokenizer)
    train_gate(model, formatter, STAGE_A)
    after_a = copy.deepcopy(model).eval()
    assert open_gate_task(model) == 1
    randomize_adapters(model, seed=4, scale=0.3)  # stage B's training moves the experts
    train_gate(model, formatter, STAGE_B)
    return model.eval(), after_a, tokenizer, formatter


def _stages(model, formatter, text):
    with torch.no_grad():
        model(input_ids=torch.tensor([formatter.prompt_ids(text)]))
    return int(next(iter(adapter_layers(model).values())).context.gate.stages[0])


def test_nearest_task_gives_the_stage_of_the_minimum():
    layer_1 = torch.tensor([[1.0, 5.0], [math.inf, 2.0]])
    layer_2 = torch.tensor([[3.0, 7.0], [math.inf, 4.0]])
    scores, stages = nearest_task([layer_1, layer_2])
    assert scores.tolist() == [2.0, 3.0] and stages.tolist() == [0, 1]
    scores, stages = nearest_task([torch.full((2, 3), math.inf)])
    assert scores.tolist() == [0.0] * 3 and stages.tolist() == [1] * 3  # no evidence: the current stage


def test_opening_a_stage_freezes_a_copy_of_the_experts_and_router():
    model, after_a, _, _ = _two_stages()
    before = adapter_layers(after_a)
    for name, layer in adapter_layers(model).items():
        assert len(layer.earlier_experts) == 1 and layer.config.gate_earlier_tasks == 1
        frozen = layer.earlier_experts[0]
        for key in ("lora_A", "lora_B", "router", "expert_scaling"):
            assert torch.equal(getattr(frozen, key), getattr(before[name], key))
            assert not getattr(layer, key).equal(getattr(frozen, key)) or key == "expert_scaling"
        assert not any(p is frozen.lora_A for p in layer.parameters())  # buffers, never trained


def test_a_prompt_of_an_earlier_stage_runs_that_stages_experts_exactly():
    model, after_a, _, formatter = _two_stages()
    for text in STAGE_A:
        assert _stages(model, formatter, text) == 0
        ids = torch.tensor([formatter.prompt_ids(text)])
        with torch.no_grad():
            torch.testing.assert_close(
                model(input_ids=ids).logits, after_a(input_ids=ids).logits, atol=1e-5, rtol=1e-5
            )
    # the current stage's prompts run the moved experts: not stage A's model
    text = STAGE_B[0]
    assert _stages(model, formatter, text) == 1
    ids = torch.tensor([formatter.prompt_ids(text)])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, after_a(input_ids=ids).logits, atol=1e-3)


def test_shared_experts_keep_no_copy():
    model, tokenizer = load_model("tiny-llama", seed=0)
    config = AdapterConfig.slim(r=4, num_experts=3, stage_experts="shared", yield_threshold=50.0)
    inject_adapters(model, config, tokenizer=tokenizer)
    formatter = PromptFormatter(tokenizer)
    train_gate(model, formatter, STAGE_A)
    assert open_gate_task(model) == 1
    assert all(len(layer.earlier_experts) == 0 for layer in adapter_layers(model).values())


def test_batched_generation_over_mixed_stages_equals_one_by_one():
    model, _, tokenizer, formatter = _two_stages()
    texts = [STAGE_A[0], STAGE_B[1], "glorp 5 and 6", "Capital of Peru, please?"]
    prompts = [formatter.prompt_ids(text) for text in texts]
    assert {_stages(model, formatter, t) for t in texts} == {0, 1}
    reference = [recompute_greedy(model, p, 5, set()) for p in prompts]
    batched = generate_greedy(
        model, prompts, lambda ids: tokenizer.decode(ids), max_new_tokens=5,
        pad_id=tokenizer.pad_token_id, stop_token_ids=set(), batch_size=4,
    )  # fmt: skip
    assert [list(g.token_ids) for g in batched] == reference


def test_stage_experts_survive_save_and_load(tmp_path):
    model, _, _, formatter = _two_stages()
    save_adapter(model, tmp_path / "adapter", "tiny-llama")
    fresh, _ = load_model("tiny-llama", seed=0)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    for text in (STAGE_A[1], STAGE_B[2], "Tell me a joke about cats"):
        ids = torch.tensor([formatter.prompt_ids(text)])
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_per_task_experts_need_the_per_task_gate():
    with pytest.raises(InputError, match="stage_experts per_task needs"):
        AdapterConfig.from_dict({"kind": "slim", "stage_experts": "per_task", "gate_statistics": "shared"})
    with pytest.raises(InputError, match="stage_experts per_task needs"):
        AdapterConfig.from_dict({"kind": "slim", "stage_experts": "per_task", "yield_pooling": "token"})
    assert AdapterConfig.from_dict({"kind": "slim"}).stage_experts == "per_task"  # the default
    # left unset, a token-level or shared-gate SLIM simply keeps one set
    assert AdapterConfig.from_dict({"kind": "slim", "yield_pooling": "token"}).stage_experts == "shared"
    assert AdapterConfig.from_dict({"kind": "moe_lora"}).stage_experts == "shared"
