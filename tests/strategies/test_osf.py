"""OSF through PEFT: exact reload, the frozen singular subspace is left alone, the preserved rank grows."""

from __future__ import annotations

import json

import pytest
import torch

from forgetless import load_model
from forgetless.errors import InputError
from forgetless.strategies import ModelSource, make_strategy
from forgetless.strategies.osf import RANKS_FILE, OSFEngine, preserved_ranks
from forgetless.training import load_stage, run_strategy

TARGETS = ("gate_proj", "up_proj", "down_proj")


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["alpha item 2?", "beta item 5?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_osf_stage_reloads_with_the_trained_logits(two_tasks, fast_config, tmp_path, monkeypatch):
    _, tokenizer = load_model("tiny-llama")
    trained = []
    original_save = OSFEngine.save

    def save(self, model, folder, source):  # the trained model, OSF layers still unmerged
        assert preserved_ranks(model), "the model to save should still hold OSF layers"
        trained.append(_logits(model.eval(), tokenizer))
        original_save(self, model, folder, source)

    monkeypatch.setattr(OSFEngine, "save", save)
    results = run_strategy("osf", {}, "tiny-llama", two_tasks[:1], fast_config, tmp_path)
    assert results[0].artifact.name == "model" and (results[0].artifact / "config.json").is_file()
    rebuilt, _ = load_stage(results[0])
    assert not preserved_ranks(rebuilt)  # a plain Hugging Face model
    assert torch.allclose(_logits(rebuilt, tokenizer), trained[0], atol=1e-5)
    base, _ = load_model("tiny-llama")
    assert not torch.allclose(_logits(base, tokenizer), trained[0], atol=1e-5)


def _subspace_shares(update: torch.Tensor, start: torch.Tensor, rank: int) -> tuple[float, float]:
    """||U_k^T D|| / ||D|| and ||D V_k^T|| / ||D||: the shares of ``update`` along the top-``rank``
    left and right singular directions of ``start`` (each alone, the stricter reading)."""
    u, _, vh = torch.linalg.svd(start.double(), full_matrices=False)
    update = update.double()
    return float((u[:, :rank].T @ update).norm() / update.norm()), float(
        (update @ vh[:rank].T).norm() / update.norm()
    )


def test_osf_stage_one_leaves_the_preserved_subspace_alone(two_tasks, fast_config, tmp_path):
    results = run_strategy("osf", {}, "tiny-llama", two_tasks, fast_config, tmp_path)
    before = load_stage(results[0])[0].state_dict()
    after = load_stage(results[1])[0].state_dict()
    ranks = json.loads((results[1].artifact / RANKS_FILE).read_text())["preserved_rank"]
    assert len(ranks) == 6  # gate/up/down x 2 layers
    for module, rank in ranks.items():
        key = f"{module}.weight"
        update = after[key] - before[key]
        assert update.norm() > 1e-3, f"{module} did not train"
        # PEFT projects the gradients and AdamW's per-element scaling leaks (12-19% along either side
        # without the after-step projection); with it the frozen directions get nothing (float noise)
        left, right = _subspace_shares(update, before[key], rank)
        assert left < 1e-3 and right < 1e-3, (module, left, right)
    untouched = [key for key in before if not any(f".{name}." in key for name in TARGETS)]
    assert "model.embed_tokens.weight" in untouched and "model.layers.0.self_attn.q_proj.weight" in untouched
    for key in untouched:
        assert torch.equal(before[key], after[key]), f"{key} changed but is not an OSF target"


def _stage_one(tmp_path):
    """Stage 0 built and saved untrained, stage 1 built on it: (strategy, stage-0 ranks, stage-1 model)."""
    strategy = make_strategy("osf", {})
    source = ModelSource("tiny-llama")
    first = strategy.build(0, source, [], seed=0)
    ranks_0 = preserved_ranks(first)
    strategy.save(first, tmp_path / "model", source)
    return strategy, ranks_0, strategy.build(1, source, [tmp_path / "model"], seed=1)


def test_osf_preserved_rank_grows_each_stage(tmp_path):
    strategy, ranks_0, second = _stage_one(tmp_path)
    ranks_1 = preserved_ranks(second)
    assert ranks_0.keys() == ranks_1.keys() and len(ranks_0) == 6
    assert all(ranks_1[name] > ranks_0[name] for name in ranks_0)
    assert set(ranks_0.values()) == {9} and set(ranks_1.values()) == {16}  # 0.3 and 0.5 of min dim 32
    saved = json.loads((tmp_path / "model" / RANKS_FILE).read_text())
    assert saved["preserved_rank"] == ranks_0 and saved["preserved_fraction"] == pytest.approx(0.3)
    engine = strategy.engine
    assert [engine.preserved_fraction(stage) for stage in (0, 1, 2, 3, 9)] == pytest.approx(
        [0.3, 0.5, 0.7, 0.9, 0.9]
    )


def test_osf_gradients_are_orthogonal_to_the_preserved_subspace(tmp_path):
    _, _, model = _stage_one(tmp_path)
    _, tokenizer = load_model("tiny-llama")
    batch = tokenizer(["beta item 5? beta code 4"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, rank in preserved_ranks(model).items():
        layer = model.get_submodule(name)
        u, _, vh = torch.linalg.svd(layer.get_base_layer().weight.detach().double(), full_matrices=False)
        factors = layer.osf_svd_params["default"]
        grad_u, grad_v = factors["U_low"].grad.double(), factors["V_low"].grad.double()
        assert (u[:, :rank].T @ grad_u).norm() < 1e-4 * grad_u.norm(), name  # unprojected: ~50%
        assert (grad_v @ vh[:rank].T).norm() < 1e-4 * grad_v.norm(), name


def test_osf_defaults_and_bad_params():
    strategy = make_strategy("osf")
    assert strategy.produces == "model" and strategy.default_lr == 5e-6
    assert strategy.describe()["params"]["target_modules"] == list(TARGETS)
    bad = [
        {"preserved_fraction": 1.5},
        {"fraction_step": -0.1},
        {"preserved_fraction": 0.6, "max_fraction": 0.5},
        {"target_modules": []},
    ]
    for params in bad:
        with pytest.raises(InputError) as caught:
            make_strategy("osf", params)
        assert "\n" not in str(caught.value) and "strategy 'osf'" in str(caught.value)
