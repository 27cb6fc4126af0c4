"""Per-task gate statistics (``gate_statistics: per_task``, SLIM's default): every training stage's
prompt statistics are kept apart and frozen, and a prompt is scored by its nearest stage."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_helpers import randomize_adapters, train_gate

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    adapter_layers,
    inject_adapters,
    load_adapter,
    open_gate_task,
    save_adapter,
)
from forgetless.adapters.gate import nearest_task_score
from forgetless.data.formatting import PromptFormatter

STAGE_A = ["zorb the glorp twice", "what does kelvar mean", "glorp 3 and 4", "name the zorbian topic"]
STAGE_B = [
    "What is the capital of Peru?",
    "Name the capital of Chile.",
    "Capital of Spain?",
    "Which city rules Japan?",
]


def _model(**fields):
    model, tokenizer = load_model("tiny-llama", seed=0)
    inject_adapters(model, AdapterConfig.slim(r=4, num_experts=3, **fields), tokenizer=tokenizer)
    randomize_adapters(model, seed=3, scale=0.3)
    return model, PromptFormatter(tokenizer)


def _score(model, formatter, text):
    with torch.no_grad():
        model(input_ids=torch.tensor([formatter.prompt_ids(text)]))
    return float(next(iter(adapter_layers(model).values())).context.gate.scores[0])


def _layers(model):
    return list(adapter_layers(model).values())


def test_nearest_task_score_is_the_minimum_over_stages_of_the_layer_mean():
    layer_1 = torch.tensor([[1.0, 5.0], [math.inf, 2.0]])  # (stages, batch)
    layer_2 = torch.tensor([[3.0, 7.0], [math.inf, 4.0]])
    assert nearest_task_score([layer_1, layer_2]).tolist() == [2.0, 3.0]
    # no stage with statistics: no evidence, score 0
    assert nearest_task_score([torch.full((1, 2), math.inf)]).tolist() == [0.0, 0.0]


def test_a_new_stage_freezes_the_last_ones_statistics_and_scores_by_the_nearest_stage():
    model, formatter = _model()
    assert open_gate_task(model) == 0  # nothing trained yet: nothing to freeze
    train_gate(model, formatter, STAGE_A)
    probe_a, probe_b = "glorp 5 and 6", "What is the capital of Peru?"
    before_a, before_b = _score(model, formatter, probe_a), _score(model, formatter, probe_b)
    frozen = {name: layer.clusters.centres.clone() for name, layer in adapter_layers(model).items()}
    assert open_gate_task(model) == 1
    for layer in _layers(model):
        assert layer.config.gate_earlier_tasks == 1 and len(layer.earlier_gates) == 1
        assert int(layer.gate_moments.batches) == 0
    # the new stage has no statistics yet: a prompt is scored by the earlier stage alone
    assert _score(model, formatter, probe_a) == pytest.approx(before_a, abs=1e-6)
    train_gate(model, formatter, STAGE_B)
    for name, layer in adapter_layers(model).items():  # stage A's clusters did not move
        assert torch.equal(layer.earlier_gates[0].clusters.centres, frozen[name])
    both_a, both_b = _score(model, formatter, probe_a), _score(model, formatter, probe_b)
    # each stage alone, by moving the other out of the layers
    earlier = {name: layer.earlier_gates for name, layer in adapter_layers(model).items()}
    for layer in _layers(model):
        layer.earlier_gates = torch.nn.ModuleList()
    stage_b_a, stage_b_b = _score(model, formatter, probe_a), _score(model, formatter, probe_b)
    for name, layer in adapter_layers(model).items():
        layer.earlier_gates = earlier[name]
    assert both_a == pytest.approx(min(before_a, stage_b_a), abs=1e-5)
    assert both_b == pytest.approx(min(before_b, stage_b_b), abs=1e-5)
    # a capital question is nearer the stage that trained on capital questions
    assert stage_b_b < before_b


def test_shared_statistics_never_open_a_stage():
    model, formatter = _model(gate_statistics="shared")
    train_gate(model, formatter, STAGE_A)
    assert open_gate_task(model) == 0
    assert all(len(layer.earlier_gates) == 0 for layer in _layers(model))


def test_earlier_stages_survive_save_and_load(tmp_path):
    model, formatter = _model()
    train_gate(model, formatter, STAGE_A)
    open_gate_task(model)
    train_gate(model, formatter, STAGE_B)
    save_adapter(model, tmp_path / "adapter", "tiny-llama")
    fresh, _ = load_model("tiny-llama", seed=0)
    load_adapter(fresh, tmp_path / "adapter")
    assert all(layer.config.gate_earlier_tasks == 1 for layer in _layers(fresh))
    fresh.eval()
    for text in ("glorp 1 and 2", "What is the capital of Peru?", "Tell me a joke about cats"):
        ids = torch.tensor([formatter.prompt_ids(text)])
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
        assert _score(fresh, formatter, text) == _score(model, formatter, text)


def test_an_adapter_saved_before_per_task_statistics_loads_as_shared(tmp_path):
    import json

    model, formatter = _model()
    train_gate(model, formatter, STAGE_A)
    folder = save_adapter(model, tmp_path / "adapter", "tiny-llama")
    manifest = json.loads((folder / "forgetless_adapter.json").read_text())
    for key in ("gate_statistics", "gate_earlier_tasks", "stage_experts"):  # fields it did not have
        del manifest["config"][key]
    (folder / "forgetless_adapter.json").write_text(json.dumps(manifest))
    fresh, _ = load_model("tiny-llama", seed=0)
    load_adapter(fresh, folder)
    assert {layer.config.gate_statistics for layer in _layers(fresh)} == {"shared"}
    assert open_gate_task(fresh) == 0  # its next stage keeps updating the one shared set
