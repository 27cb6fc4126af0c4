"""evaluate_task / evaluate_tasks / run_eval wiring: routes, determinism, errors, output file."""

from __future__ import annotations

import json

import pytest
import torch

from forgetless.data.formatting import PromptFormatter
from forgetless.data.task import Example, Task
from forgetless.errors import InputError
from forgetless.evaluation import evaluate_task, evaluate_tasks, generate_greedy, run_eval


def _mc_task(n: int = 6) -> Task:
    test = [
        Example(
            f"Question {i}: which word fits?", "alpha", choices=("alpha", "beta gamma", "delta"), gold=i % 3
        )
        for i in range(n)
    ]
    return Task("mc", train=[], test=test, metric="loglik_mc")


def test_loglik_route_scores_gold_by_argmax(tiny_llama, full_sequence_loglik):
    """Make gold the choice a plain full forward prefers: accuracy must be 1; the worst choice gives 0."""
    model, tokenizer = tiny_llama
    formatter = PromptFormatter(tokenizer, "plain")
    base = _mc_task()
    best, worst = [], []
    for example in base.test:
        prompt = formatter.prompt_ids(example.prompt)
        lls = [
            full_sequence_loglik(model, prompt, formatter.answer_ids(example.prompt, c))
            for c in example.choices
        ]
        best.append(Example(example.prompt, "", example.choices, lls.index(max(lls))))
        worst.append(Example(example.prompt, "", example.choices, lls.index(min(lls))))
    good = evaluate_task(
        model, tokenizer, Task("mc", [], best, metric="loglik_mc"), style="plain", batch_size=4
    )
    bad = evaluate_task(
        model, tokenizer, Task("mc", [], worst, metric="loglik_mc"), style="plain", batch_size=4
    )
    assert good.score == 1.0 and good.measures["acc"] == 1.0 and good.n == 6
    assert bad.score == 0.0
    assert set(good.measures) == {"acc", "acc_norm", "acc_bytes"}
    assert [d["predicted"] for d in good.details] == [e.gold for e in best]


def test_generation_route_uses_formatter_stop_and_metric(tiny_llama):
    """References set to the model's own greedy replies score 1 with exact_match; others 0."""
    model, tokenizer = tiny_llama
    formatter = PromptFormatter(tokenizer, "chat")
    prompts = ["Say something.", "What is two plus two?", "Name a colour."]
    replies = generate_greedy(model, [formatter.prompt_ids(p) for p in prompts],
                              lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                              max_new_tokens=5, pad_id=tokenizer.pad_token_id)  # fmt: skip
    own = Task("own", [], [Example(p, r.text) for p, r in zip(prompts, replies)], max_new_tokens=5)
    scored = evaluate_task(model, tokenizer, own, style="chat", batch_size=2)
    assert scored.score == 1.0 and scored.generated_tokens == sum(len(r.token_ids) for r in replies)
    assert [d["prediction"] for d in scored.details] == [r.text for r in replies]
    other = Task("other", [], [Example(p, "zzqx unlikely") for p in prompts], max_new_tokens=5)
    assert evaluate_task(model, tokenizer, other, style="chat").score == 0.0


def test_evaluation_is_deterministic_and_restores_training_mode(tiny_llama):
    model, tokenizer = tiny_llama
    model.train()
    task = _mc_task(9)
    first = evaluate_task(model, tokenizer, task, seed=3, limit=5)
    second = evaluate_task(model, tokenizer, task, seed=3, limit=5)
    assert model.training
    assert first.n == 5
    assert [d["loglikelihoods"] for d in first.details] == [d["loglikelihoods"] for d in second.details]
    # the limit draws the same seeded sample whatever the batch size
    third = evaluate_task(model, tokenizer, task, seed=3, limit=5, batch_size=1)
    assert [d["prompt"] for d in third.details] == [d["prompt"] for d in first.details]
    for a, b in zip(first.details, third.details):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)


def test_input_errors(tiny_llama):
    model, tokenizer = tiny_llama
    plain = Task("plain", [], [Example("q", "a")], metric="loglik_mc")
    with pytest.raises(InputError, match="needs choices"):
        evaluate_task(model, tokenizer, plain)
    with pytest.raises(InputError, match="unknown scorer"):
        evaluate_task(model, tokenizer, Task("t", [], [Example("q", "a")], metric="blue"))
    with pytest.raises(InputError, match="no test examples"):
        evaluate_task(model, tokenizer, Task("t", [], []))
    with pytest.raises(InputError, match="limit"):
        evaluate_task(model, tokenizer, _mc_task(), limit=0)


def test_evaluate_tasks_accepts_names_and_tasks(tiny_llama):
    model, tokenizer = tiny_llama
    scores = evaluate_tasks(model, tokenizer, ["general_commonsense", _mc_task()], limit=3)
    assert set(scores) == {"general_commonsense", "mc"}
    assert all(0.0 <= s.score <= 1.0 and s.n == 3 for s in scores.values())


def test_run_eval_writes_json_and_checks_tasks_first(tmp_path):
    out = tmp_path / "eval.json"
    spec = tmp_path / "task.yaml"
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"Q{i}?", "a": "yes"}) for i in range(3)) + "\n")
    spec.write_text(f"name: mine\ntest: {data.name}\nfields: {{prompt: q, answer: a}}\nmax_new_tokens: 3\n")
    result = run_eval("tiny-llama", None, ["general_commonsense", str(spec)], out, limit=2, batch_size=2)
    written = json.loads(out.read_text())
    assert written["scores"] == result["scores"] and set(written["scores"]) == {"general_commonsense", "mine"}
    assert written["general"] == {"commonsense": result["scores"]["general_commonsense"]}
    assert written["tasks"]["mine"]["n"] == 2 and len(written["tasks"]["mine"]["details"]) == 2
    with pytest.raises(InputError, match="unknown task or suite"):
        run_eval("no-such-model-either", None, ["general_comonsense"], None)


def test_run_eval_with_saved_adapter(tmp_path):
    adapters = pytest.importorskip("forgetless.adapters")
    from forgetless import load_model

    model, _ = load_model("tiny-llama")
    adapters.inject_adapters(model, adapters.AdapterConfig(kind="lora", r=2, seed=0))
    with torch.no_grad():
        for parameter in adapters.trainable_parameters(model):
            parameter.normal_(0, 0.5)
    folder = adapters.save_adapter(model, tmp_path / "adapter", base_model="tiny-llama")
    with_adapter = run_eval("tiny-llama", folder, ["general_commonsense"], None, limit=4)
    without = run_eval("tiny-llama", None, ["general_commonsense"], None, limit=4)
    lls = [d["loglikelihoods"] for d in with_adapter["tasks"]["general_commonsense"]["details"]]
    base_lls = [d["loglikelihoods"] for d in without["tasks"]["general_commonsense"]["details"]]
    assert lls != base_lls  # the adapter was loaded and changes the model


@pytest.mark.real_model
def test_real_model_knows_common_sense(default_model):
    """SmolLM2-135M-Instruct is well above chance (1/3) on the built-in common-sense probe."""
    model, tokenizer = default_model
    scores = evaluate_tasks(model, tokenizer, ["general_commonsense"], limit=16, batch_size=16)
    assert scores["general_commonsense"].score >= 0.5


def test_fit_prompt_keeps_the_end_and_the_bos_token():
    from forgetless.evaluation.evaluate import fit_prompt

    assert fit_prompt([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert fit_prompt([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
    assert fit_prompt([5, 6], 3, bos_id=1) == [5, 6] and fit_prompt([5, 6], None, bos_id=None) == [5, 6]


def test_prompts_longer_than_the_context_are_truncated(tiny_llama):
    """tiny-llama has 1024 positions: a 1500-token prompt still evaluates (its end is kept)."""
    from forgetless.evaluation.evaluate import context_length

    model, tokenizer = tiny_llama
    assert context_length(model) == 1024
    long = " ".join(["word"] * 1500) + " Which word?"
    mc = Task("long", [], [Example(long, "word", choices=("word", "other"), gold=0)], metric="loglik_mc")
    assert evaluate_task(model, tokenizer, mc, style="plain").n == 1
    gen = Task("long_gen", [], [Example(long, "word")], max_new_tokens=3)
    assert evaluate_task(model, tokenizer, gen, style="plain").n == 1


def test_task_max_prompt_tokens_cuts_prompts_as_training_does(tiny_llama, monkeypatch):
    """A task's max_prompt_tokens bounds every scored prompt (BOS kept first), for both routes."""
    import forgetless.evaluation.evaluate as evaluate_module

    model, tokenizer = tiny_llama
    seen = []
    for name in ("choice_loglikelihoods", "generate_greedy"):
        real = getattr(evaluate_module, name)

        def spy(model, prompts, *args, real=real, **kwargs):
            seen.append([list(p) for p in prompts])
            return real(model, prompts, *args, **kwargs)

        monkeypatch.setattr(evaluate_module, name, spy)
    long = " ".join(["word"] * 300) + " Which word?"
    mc = Task("mc", [], [Example(long, "word", choices=("word", "other"), gold=0)], metric="loglik_mc",
              max_prompt_tokens=40)  # fmt: skip
    gen = Task("gen", [], [Example(long, "word")], max_new_tokens=3, max_prompt_tokens=40)
    evaluate_task(model, tokenizer, mc)
    evaluate_task(model, tokenizer, gen)
    full = PromptFormatter(tokenizer).prompt_ids(long)
    assert len(full) > 300
    for prompts in seen:
        assert (
            prompts[0] == evaluate_module.fit_prompt(full, 40, tokenizer.bos_token_id)
            and len(prompts[0]) == 40
        )
    assert mc.fingerprint() != Task("mc", [], mc.test, metric="loglik_mc").fingerprint()
