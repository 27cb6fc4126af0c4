"""run_strategy / load_stage: stage folders, never recomputing a finished stage, resume, input errors."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import make_task

from forgetless.errors import InputError
from forgetless.training import TrainConfig, load_stage, results_table, run_strategy, stage_folder
from forgetless.training import loop as loop_module
from forgetless.training import runner as runner_module


@pytest.fixture()
def tasks():
    return [make_task("alpha", 3), make_task("beta", 5, size=8)]


@pytest.fixture()
def config():
    return {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False, "checkpoint_every": 1}


def _probe(model, tokenizer):
    """Logits on a chat-formatted training prompt (SLIM's gate yields on raw text unlike it)."""
    from forgetless.data import PromptFormatter

    ids = torch.tensor([PromptFormatter(tokenizer).prompt_ids("alpha item 1?")])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_finished_stages_are_not_trained_again(tasks, config, tmp_path, monkeypatch):
    first = []
    results = run_strategy(
        "sequential_lora",
        {"r": 4},
        "tiny-llama",
        tasks,
        config,
        tmp_path,
        on_stage_end=lambda i, m, t: first.append(_probe(m, t)),
    )
    assert [r.cached for r in results] == [False, False]
    assert [r.folder.name for r in results] == ["stage-0-alpha", "stage-1-beta"]

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(runner_module, "train_model", must_not_train)
    again = []
    cached = run_strategy(
        "sequential_lora",
        {"r": 4},
        "tiny-llama",
        tasks,
        config,
        tmp_path,
        on_stage_end=lambda i, m, t: again.append(_probe(m, t)),
    )
    assert [r.cached for r in cached] == [True, True]
    rows = results_table(cached)
    assert [(row["stage"], row["task"], row["steps"], row["cached"]) for row in rows] == [
        (0, "alpha", 3, True),
        (1, "beta", 3, True),
    ]
    assert [r.summary for r in cached] == [r.summary for r in results]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_killed_run_resumes_to_the_same_result(tasks, config, tmp_path, monkeypatch):
    run_strategy("olora", {"r": 4}, "tiny-llama", tasks, config, tmp_path / "whole")
    real_factor = loop_module.lr_factor
    calls = {"n": 0}

    def killed_in_stage_two(step, *args):
        calls["n"] += 1
        if calls["n"] == 5:  # stage 1 did 3 steps; stage 2 dies at its second step
            raise KeyboardInterrupt
        return real_factor(step, *args)

    monkeypatch.setattr(loop_module, "lr_factor", killed_in_stage_two)
    with pytest.raises(KeyboardInterrupt):
        run_strategy("olora", {"r": 4}, "tiny-llama", tasks, config, tmp_path / "killed")
    assert (tmp_path / "killed" / "stage-0-alpha" / "done.json").exists()
    assert (tmp_path / "killed" / "stage-1-beta" / "checkpoint" / "state.json").exists()
    monkeypatch.setattr(loop_module, "lr_factor", real_factor)
    resumed = run_strategy("olora", {"r": 4}, "tiny-llama", tasks, config, tmp_path / "killed")
    assert [r.cached for r in resumed] == [True, False]
    assert resumed[1].summary["resumed_from_step"] == 1
    whole = json.loads((tmp_path / "whole" / "stage-1-beta" / "done.json").read_text())
    assert resumed[1].summary["final_loss"] == whole["summary"]["final_loss"]
    ours, _ = load_stage(resumed[1])
    theirs, _ = load_stage(tmp_path / "whole" / "stage-1-beta")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_a_kill_between_done_and_the_checkpoint_delete_leaves_no_checkpoint(
    tasks, config, tmp_path, monkeypatch
):
    real_rmtree = runner_module.shutil.rmtree

    def killed_before_the_delete(path, *args, **kwargs):
        if str(path).endswith("checkpoint"):
            raise KeyboardInterrupt  # done.json is written, the checkpoint is still there
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(runner_module.shutil, "rmtree", killed_before_the_delete)
    with pytest.raises(KeyboardInterrupt):
        run_strategy("sequential_lora", {"r": 4}, "tiny-llama", tasks[:1], config, tmp_path)
    stage = tmp_path / "stage-0-alpha"
    assert (stage / "done.json").exists() and (stage / "checkpoint").exists()
    monkeypatch.setattr(runner_module.shutil, "rmtree", real_rmtree)
    resumed = run_strategy("sequential_lora", {"r": 4}, "tiny-llama", tasks[:1], config, tmp_path)
    assert [r.cached for r in resumed] == [True]
    assert not (stage / "checkpoint").exists()


def test_stage_folder_with_other_settings_is_refused(tasks, config, tmp_path):
    run_strategy("sequential_lora", {"r": 4}, "tiny-llama", tasks[:1], config, tmp_path)
    with pytest.raises(InputError, match="stage-0-alpha holds a stage trained with other settings"):
        run_strategy("sequential_lora", {"r": 8}, "tiny-llama", tasks[:1], config, tmp_path)


def test_a_changed_package_default_is_not_silently_reused(tasks, config, tmp_path, monkeypatch):
    from forgetless.adapters import config as adapter_config

    params = {"r": 2, "num_experts": 2, "top_k": 1}
    run_strategy("slim", params, "tiny-llama", tasks[:1], config, tmp_path)
    run_strategy("slim", params, "tiny-llama", tasks[:1], config, tmp_path)  # same defaults: reused
    old = adapter_config._KIND_DEFAULTS["slim"]["l1_weight"]
    slim_defaults = {**adapter_config._KIND_DEFAULTS["slim"], "l1_weight": 0.5}
    monkeypatch.setitem(adapter_config._KIND_DEFAULTS, "slim", slim_defaults)
    with pytest.raises(
        InputError, match=rf"trained with l1_weight={old}, but the settings now give l1_weight=0.5"
    ):
        run_strategy("slim", params, "tiny-llama", tasks[:1], config, tmp_path)


def test_a_changed_inference_default_is_applied_to_the_reused_stage(tasks, config, tmp_path, monkeypatch):
    """Masking is inference-only, so a stage saved with another mask ratio is what today's settings
    train: it is reused (no training), scored with today's ratio, and flagged for score caches."""
    from forgetless.adapters import adapter_layers
    from forgetless.adapters import config as adapter_config

    params = {"r": 2, "num_experts": 2, "top_k": 1}
    seen = []

    def record(stage, model, tokenizer):
        ratios = {layer.config.mask_ratio for layer in adapter_layers(model).values()}
        applied = runner_module.applied_options(model, stage_folder(tmp_path, stage, tasks[stage].name))
        seen.append((ratios, applied, _probe(model, tokenizer)))

    run_strategy("slim", params, "tiny-llama", tasks[:1], config, tmp_path, on_stage_end=record)
    old = adapter_config._KIND_DEFAULTS["slim"]["mask_ratio"]
    slim_defaults = {**adapter_config._KIND_DEFAULTS["slim"], "mask_ratio": 0.7}
    monkeypatch.setitem(adapter_config._KIND_DEFAULTS, "slim", slim_defaults)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a stage that trains the same today was trained again")

    with monkeypatch.context() as patch:
        patch.setattr(runner_module, "train_model", must_not_train)
        results = run_strategy("slim", params, "tiny-llama", tasks[:1], config, tmp_path, on_stage_end=record)
    assert results[0].cached
    assert seen[0][:2] == ({old}, {})
    assert seen[1][:2] == ({0.7}, {"mask_ratio": 0.7})
    assert not torch.equal(seen[0][2], seen[1][2])  # the new ratio is really applied

    # a fresh run trained under the new default gives the same scores as the reused stage
    fresh = []
    run_strategy("slim", params, "tiny-llama", tasks[:1], config, tmp_path / "fresh",
                 on_stage_end=lambda i, m, t: fresh.append(_probe(m, t)))  # fmt: skip
    torch.testing.assert_close(fresh[0], seen[1][2], rtol=0, atol=0)


def test_replay_in_semi_cooperative_is_refused_before_compute(tasks, tmp_path):
    with pytest.raises(InputError) as caught:
        run_strategy("replay", {}, "tiny-llama", tasks, {}, tmp_path, setting="semi_cooperative")
    assert str(caught.value) == (
        "strategy 'replay' needs setting fully_cooperative (old data is gone in semi_cooperative); "
        "set setting: fully_cooperative or choose another strategy"
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name", "params", "train", "message"),
    [
        ("sequentail_lora", {}, {}, "Did you mean 'sequential_lora'"),
        ("sequential_lora", {"rank": 4}, {}, "unknown parameter 'rank' for strategy 'sequential_lora'"),
        ("olora", {"lambda": -1}, {}, "lambda"),
        ("one_round", {"mode": "fft", "r": 4}, {}, "'r' is an adapter setting but mode is fft"),
        ("sequential_lora", {}, {"epoch": 2}, "unknown key 'epoch'. Did you mean 'epochs'?"),
        ("sequential_lora", {}, {"batch_size": 0}, "train: batch_size: "),
    ],
)
def test_bad_input_is_one_line(tasks, tmp_path, name, params, train, message):
    with pytest.raises(InputError) as caught:
        run_strategy(name, params, "tiny-llama", tasks, train, tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_task_without_training_data_is_refused(tmp_path):
    empty = make_task("empty", 1)
    empty.train = []
    with pytest.raises(InputError, match="task 'empty' has no training examples"):
        run_strategy("sequential_lora", {}, "tiny-llama", [empty], {}, tmp_path)


def test_one_round_artifacts_are_peft_loadable_inputs_for_merging(tasks, config, tmp_path):
    from peft import PeftModel

    from forgetless import load_model

    results = run_strategy("one_round", {"r": 4}, "tiny-llama", tasks, config, tmp_path)
    assert [r.produces for r in results] == ["per_task", "per_task"]
    assert [r.trained_on for r in results] == [{"alpha": 12}, {"beta": 8}]
    for result in results:
        base, tokenizer = load_model("tiny-llama")
        peft_model = PeftModel.from_pretrained(base, str(result.artifact))
        ours, _ = load_stage(result)
        assert torch.allclose(_probe(peft_model, tokenizer), _probe(ours, tokenizer), atol=1e-5)


def test_train_config_object_and_mapping_agree(tasks, tmp_path):
    values = {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False}
    by_mapping = run_strategy("sequential_lora", {"r": 4}, "tiny-llama", tasks[:1], values, tmp_path / "a")
    by_object = run_strategy(
        "sequential_lora", {"r": 4}, "tiny-llama", tasks[:1], TrainConfig(**values), tmp_path / "b"
    )
    ours, theirs = load_stage(by_mapping[0])[0].state_dict(), load_stage(by_object[0])[0].state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_seed_also_picks_the_tiny_base_model(tasks, tmp_path):
    """Tiny test models are built from a seed: the run's seed, as the experiment's base evaluation uses."""
    from forgetless import load_model

    config = {"max_steps": 1, "batch_size": 4, "progress": False, "seed": 1}
    results = run_strategy("sequential_lora", {"r": 4}, "tiny-llama", tasks[:1], config, tmp_path)
    assert json.loads((results[0].folder / "done.json").read_text())["model_seed"] == 1
    rebuilt, _ = load_stage(results[0])
    expected = load_model("tiny-llama", seed=1)[0].state_dict()["model.embed_tokens.weight"]
    assert torch.equal(rebuilt.state_dict()["model.embed_tokens.weight"], expected)
