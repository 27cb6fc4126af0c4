"""Pseudo replay: what before_training generates and adds, its determinism, and which model writes it."""

from __future__ import annotations

import json

import pytest

from forgetless import load_model
from forgetless.data import Example, PromptFormatter
from forgetless.data.formatting import IGNORE_INDEX
from forgetless.errors import InputError
from forgetless.evaluation.evaluate import stop_token_ids_of
from forgetless.evaluation.inference import generate_greedy
from forgetless.strategies import STRATEGIES, check_setting, make_strategy
from forgetless.strategies.context import StageContext
from forgetless.training import load_stage, run_strategy

PARAMS = {"fraction": 0.5, "max_new_tokens": 8}


def _context(stage, model, tasks, tokenizer, seed=0) -> StageContext:
    formatter = PromptFormatter(tokenizer)
    encoded = [formatter.encode(example) for example in tasks[stage].train]
    return StageContext(
        stage=stage, tasks=tasks, model=model, tokenizer=tokenizer, examples=encoded,
        pad_id=tokenizer.pad_token_id, seed=seed,
    )  # fmt: skip


def _greedy(model, tokenizer, prompts, max_new_tokens=8) -> list[str]:
    formatter = PromptFormatter(tokenizer)
    generations = generate_greedy(
        model,
        [formatter.prompt_ids(prompt) for prompt in prompts],
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        max_new_tokens=max_new_tokens,
        pad_id=tokenizer.pad_token_id,
        stop_token_ids=stop_token_ids_of(model, tokenizer, formatter),
    )
    return [generation.text for generation in generations]


def _pseudo(strategy, stage, model, tasks, tokenizer, seed=0) -> tuple[StageContext, int]:
    context = _context(stage, model, tasks, tokenizer, seed)
    own = len(context.examples)
    strategy.before_training(context)
    return context, own


def test_params_modes_and_errors():
    strategy = make_strategy("pseudo_replay", {"r": 4})
    assert strategy.describe()["params"] == {
        "mode": "lora", "source": "outputs", "fraction": 0.2, "max_new_tokens": 48, "temperature": 1.0, "r": 4,
    }  # fmt: skip
    assert strategy.produces == "adapter" and strategy.engine.continuation == "merge"
    fft = make_strategy("pseudo_replay", {"mode": "fft"})
    assert fft.produces == "model" and fft.engine.continuation == "continue"
    with pytest.raises(InputError, match="fraction"):
        make_strategy("pseudo_replay", {"fraction": -0.1})
    with pytest.raises(InputError, match="source"):
        make_strategy("pseudo_replay", {"source": "old_data"})
    with pytest.raises(InputError, match="mode is fft"):
        make_strategy("pseudo_replay", {"mode": "fft", "r": 4})


def test_semi_cooperative_setting_is_accepted():
    assert STRATEGIES.get("pseudo_replay").setting_required == "any"
    check_setting("pseudo_replay", "semi_cooperative")
    check_setting("pseudo_replay", "fully_cooperative")


def test_adds_the_starting_models_greedy_answers(two_tasks):
    model, tokenizer = load_model("tiny-llama")
    model.train()
    strategy = make_strategy("pseudo_replay", PARAMS)
    context, own = _pseudo(strategy, 0, model, two_tasks, tokenizer)
    assert own == 12 and len(context.examples) == own + round(0.5 * own) == own + len(strategy.records)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode restored, no grads

    records = strategy.records
    prompts = [record["prompt"] for record in records]
    assert all(prompt.strip() for prompt in prompts)
    assert not set(prompts) & {example.prompt for example in two_tasks[0].train}
    model.eval()
    assert [record["answer"] for record in records] == _greedy(model, tokenizer, prompts)

    formatter = PromptFormatter(tokenizer)
    for record, encoded in zip(records, context.examples[own:]):
        prompt_ids = formatter.prompt_ids(record["prompt"])
        answer = formatter.answer_ids(record["prompt"], record["answer"])
        answer += formatter.end_ids if record["complete"] else []
        assert encoded.input_ids == prompt_ids + answer
        assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + answer
        if record["complete"]:  # a finished answer is encoded exactly as training data is
            assert encoded == formatter.encode(Example(record["prompt"], record["answer"]))


def test_same_seed_same_examples_other_stage_or_seed_other_prompts(two_tasks):
    model, tokenizer = load_model("tiny-llama")
    first, again = make_strategy("pseudo_replay", PARAMS), make_strategy("pseudo_replay", PARAMS)
    context, own = _pseudo(first, 0, model, two_tasks, tokenizer)
    context_again, _ = _pseudo(again, 0, model, two_tasks, tokenizer)
    assert first.records == again.records
    assert context.examples[own:] == context_again.examples[own:]

    prompts = [record["prompt"] for record in first.records]
    other_stage = make_strategy("pseudo_replay", {**PARAMS, "fraction": 0.75})  # 6 of stage 1's 8
    _pseudo(other_stage, 1, model, two_tasks, tokenizer)
    assert len(other_stage.records) == 6
    assert [record["prompt"] for record in other_stage.records] != prompts
    other_seed = make_strategy("pseudo_replay", PARAMS)
    _pseudo(other_seed, 0, model, two_tasks, tokenizer, seed=1)
    assert [record["prompt"] for record in other_seed.records] != prompts


def test_fraction_zero_adds_nothing(two_tasks):
    model, tokenizer = load_model("tiny-llama")
    strategy = make_strategy("pseudo_replay", {"fraction": 0})
    context, own = _pseudo(strategy, 0, model, two_tasks, tokenizer)
    assert len(context.examples) == own and strategy.records == []


def test_stage_one_rehearses_the_model_after_stage_zero(two_tasks, fast_config, tmp_path):
    results = run_strategy("pseudo_replay", PARAMS, "tiny-llama", two_tasks, fast_config, tmp_path)
    states = [json.loads((r.folder / "state" / "state.json").read_text()) for r in results]
    assert [state["count"] for state in states] == [6, 4]
    assert (results[1].folder / "state" / "state.safetensors").is_file()
    prompts = [record["prompt"] for record in states[1]["examples"]]
    answers = [record["answer"] for record in states[1]["examples"]]

    after_stage_0, tokenizer = load_stage(results[0])
    assert answers == _greedy(after_stage_0, tokenizer, prompts)
    base, _ = load_model("tiny-llama")
    assert answers != _greedy(base, tokenizer, prompts)  # stage 0 moved the model and its answers
    # the questions too were sampled from the model after stage 0 (seed 0, stage 1)
    from forgetless.strategies.pseudo_replay import generate_pseudo_examples

    strategy = make_strategy("pseudo_replay", PARAMS)
    again = generate_pseudo_examples(after_stage_0, tokenizer, 4, 0, 1, strategy.params)
    assert again == states[1]["examples"]
