"""SSR: in-context synthesis by the base model, selection, refinement by the stage's model, rehearsal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from forgetless import load_model
from forgetless.data import Example, PromptFormatter
from forgetless.errors import InputError
from forgetless.evaluation.evaluate import stop_token_ids_of
from forgetless.evaluation.inference import generate_greedy
from forgetless.strategies import STRATEGIES, check_setting, make_strategy
from forgetless.strategies import ssr as ssr_module
from forgetless.strategies.pseudo_replay import sample_replies
from forgetless.training import load_stage, run_strategy

# what the fake sampler "writes": valid inputs, an unparsable reply, a duplicate, a training prompt
WRITTEN = [
    " What colour is the sky?\nOutput:",
    " Name a large city.\nOutput:",
    " no mark at all",
    " What colour is the sky?\nOutput:",
    " Add two and three.\nOutput:",
    " How do birds fly?\nOutput:",
]


def test_params_modes_and_errors():
    strategy = make_strategy("ssr", {"r": 4})
    assert strategy.describe()["params"] == {
        "mode": "lora", "shots": 3, "fraction": 0.2, "oversample": 3.0, "max_new_tokens": 96,
        "temperature": 1.0, "context_tokens": 1024, "r": 4,
    }  # fmt: skip
    assert strategy.produces == "adapter" and strategy.engine.continuation == "merge"
    assert make_strategy("ssr", {"mode": "fft"}).engine.continuation == "continue"
    with pytest.raises(InputError, match="oversample"):
        make_strategy("ssr", {"oversample": 0.5})
    with pytest.raises(InputError, match="shots"):
        make_strategy("ssr", {"shots": 0})
    assert STRATEGIES.get("ssr").setting_required == "any"
    check_setting("ssr", "semi_cooperative")


def test_prompt_format_and_parsing():
    demos = [Example("Q one?", "A1"), Example(" Q two? ", "A2 ")]
    assert (
        ssr_module.icl_prompt(demos)
        == "Instruction: Q one?\nOutput: A1\n\nInstruction: Q two?\nOutput: A2\n\nInstruction:"
    )
    assert ssr_module.parse_input(" New question?\nOutput: its answer") == "New question?"
    assert ssr_module.parse_input(" runs on without the mark") is None
    assert ssr_module.parse_input("\nOutput: nothing before it") is None
    valid, dropped = ssr_module._valid_inputs(
        [text + " x" for text in WRITTEN] + [" Q one?\nOutput:"], demos
    )  # fmt: skip
    assert valid == [
        "What colour is the sky?",
        "Name a large city.",
        "Add two and three.",
        "How do birds fly?",
    ]
    assert dropped == {"no_output_mark": 1, "duplicate": 1, "copy_of_training_prompt": 1}


def test_select_diverse_takes_one_per_cluster_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    points = np.concatenate([centre + rng.normal(0, 0.1, (5, 3)) for centre in centres])
    chosen = ssr_module.select_diverse(points, 3, seed=1)
    assert sorted(index // 5 for index in chosen) == [0, 1, 2]  # one per blob
    for blob, index in zip(range(3), chosen):  # and the member nearest the blob's mean
        members = points[blob * 5 : blob * 5 + 5]
        assert index == blob * 5 + int(np.argmin(((members - members.mean(0)) ** 2).sum(1)))
    assert ssr_module.select_diverse(points, 3, seed=1) == chosen
    assert ssr_module.select_diverse(points[:2], 3, seed=1) == [0, 1]
    duplicates = np.zeros((6, 2))  # every point equal: empty clusters are made up, k distinct rows
    assert len(set(ssr_module.select_diverse(duplicates, 4, seed=0))) == 4


def test_sampler_stops_rows_when_until_holds():
    model, tokenizer = load_model("tiny-llama")
    prompts = [tokenizer("alpha beta").input_ids, tokenizer("gamma").input_ids]

    def sample(until=None):
        return sample_replies(
            model, prompts, pad_id=tokenizer.pad_token_id, stop_token_ids=set(), max_new_tokens=8,
            temperature=1.0, generator=torch.Generator().manual_seed(0), until=until,
        )  # fmt: skip

    full, cut = sample(), sample(lambda ids: len(ids) >= 3)
    assert [len(reply) for reply in full] == [8, 8]
    assert cut == [reply[:3] for reply in full]  # the same draws, each row stopped after 3 tokens


def _fake_sampler(calls):
    def fake(model, prompts, **kwargs):
        calls.append({"prompts": [list(p) for p in prompts], "model": model, **kwargs})
        tokenizer = calls[0]["tokenizer"]
        return [tokenizer(WRITTEN[i % len(WRITTEN)]).input_ids for i in range(len(prompts))]

    return fake


def test_two_stages_write_select_refine_and_rehearse(two_tasks, fast_config, tmp_path, monkeypatch):
    _, tokenizer = load_model("tiny-llama")
    calls: list[dict] = [{"tokenizer": tokenizer}]
    monkeypatch.setattr(ssr_module, "sample_replies", _fake_sampler(calls))
    params = {"fraction": 0.25, "oversample": 2, "shots": 2, "max_new_tokens": 6}
    results = run_strategy("ssr", params, "tiny-llama", two_tasks, fast_config, tmp_path)
    states = [json.loads((r.folder / "state" / "state.json").read_text()) for r in results]

    # stage 0: 12 own examples -> 3 kept of 6 candidates, 4 of them valid (one unparsable, one duplicate)
    assert [state["candidates"] for state in states] == [6, 4]
    assert states[0]["dropped"] == {"no_output_mark": 1, "duplicate": 1, "copy_of_training_prompt": 0}
    assert states[0]["valid"] == 4 and states[0]["kept"] == 3 == len(states[0]["examples"])
    prompts = [record["prompt"] for record in states[0]["examples"]]
    assert set(prompts) < {
        "What colour is the sky?",
        "Name a large city.",
        "Add two and three.",
        "How do birds fly?",
    }

    # the in-context prompts: `shots` demonstrations of the stage's own task, then "Instruction:"
    first = tokenizer.decode(calls[1]["prompts"][0])
    assert first.endswith("Instruction:") and first.count("Instruction:") == 3
    alpha_prompts = {example.prompt for example in two_tasks[0].train}
    assert sum(f"Instruction: {p}\n" in first for p in alpha_prompts) == 2
    # written by the base model, not the trained one
    base, _ = load_model("tiny-llama")
    writer = calls[1]["model"]
    assert all(torch.equal(a, b) for a, b in zip(writer.state_dict().values(), base.state_dict().values()))

    # refined: the answers are the stage-0 model's greedy answers
    after_stage_0, _ = load_stage(results[0])
    formatter = PromptFormatter(tokenizer)
    greedy = generate_greedy(
        after_stage_0, [formatter.prompt_ids(p) for p in prompts],
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True), max_new_tokens=6,
        pad_id=tokenizer.pad_token_id, stop_token_ids=stop_token_ids_of(after_stage_0, tokenizer, formatter),
    )  # fmt: skip
    assert [record["answer"] for record in states[0]["examples"]] == [g.text for g in greedy]
    from_base = generate_greedy(
        base, [formatter.prompt_ids(p) for p in prompts], lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        max_new_tokens=6, pad_id=tokenizer.pad_token_id, stop_token_ids=stop_token_ids_of(base, tokenizer, formatter),
    )  # fmt: skip
    assert [g.text for g in from_base] != [g.text for g in greedy]  # stage 0 moved the answers

    # stage 1 rehearses stage 0's memory and nothing of task alpha's data
    assert results[1].trained_on == {"beta": 8, "ssr": 3}
    assert "ssr" not in results[0].trained_on


def test_same_seed_same_memory(two_tasks, fast_config, tmp_path, monkeypatch):
    _, tokenizer = load_model("tiny-llama")
    monkeypatch.setattr(ssr_module, "sample_replies", _fake_sampler([{"tokenizer": tokenizer}]))
    params = {"fraction": 0.25, "oversample": 2}
    runs = [run_strategy("ssr", params, "tiny-llama", two_tasks[:1], fast_config, tmp_path / n) for n in "ab"]
    memories = [json.loads((r[0].folder / "state" / "state.json").read_text())["examples"] for r in runs]
    assert memories[0] == memories[1] and memories[0]
