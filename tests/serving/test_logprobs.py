"""Prompt log-probabilities (``echo`` + ``logprobs``): they equal the model's own logits, padded
rows included, and lm-eval's ``local-completions`` model reads them into forgetless's scores."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from serving_helpers import client

from forgetless.evaluation.inference import choice_loglikelihoods

CONTEXT = "Question: what is the capital of France?\nAnswer:"


def _reference(model, ids):
    """(L - 1) log-probabilities of tokens 1.. of ``ids`` and the (L - 1, V) distributions, from
    one unbatched forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))], logprobs[:-1]


def test_echoed_prompt_logprobs_equal_the_models_logits(served, tiny):
    url, _ = served
    model, tokenizer = tiny
    prompts = [tokenizer(CONTEXT + " Paris").input_ids, tokenizer("Hi there").input_ids]  # one is padded
    reply = client(url).completions.create(
        model="tiny-llama", prompt=prompts, max_tokens=0, echo=True, logprobs=3, temperature=0
    )
    for ids, choice in zip(prompts, reply.choices):
        expected, distributions = _reference(model, ids)
        scored = choice.logprobs
        assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
        assert scored.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
        assert scored.tokens == [tokenizer.decode([token]) for token in ids]
        for top, distribution in zip(scored.top_logprobs[1:], distributions):
            values, alternatives = distribution.topk(3)
            assert list(top) == [tokenizer.decode([token]) for token in alternatives.tolist()]
            assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-5)
        assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 0
    assert reply.usage.prompt_tokens == sum(map(len, prompts))


def test_echo_with_a_generated_token_reports_prompt_then_reply(served, tiny):
    url, _ = served
    model, tokenizer = tiny
    ids = tokenizer(CONTEXT).input_ids
    reply = client(url).completions.create(
        model="tiny-llama", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    scored = reply.choices[0].logprobs
    assert len(scored.token_logprobs) == len(ids) + 1
    with torch.no_grad():
        last = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    assert scored.token_logprobs[-1] == pytest.approx(float(last.max()), abs=1e-5)  # greedy: the top token
    assert scored.text_offset[-1] == len(tokenizer.decode(ids))


def test_lm_evals_local_completions_reads_forgetless_loglikelihoods(served, tiny):
    """The request lm-eval's ``local-completions`` sends, parsed by lm-eval's own code, gives the
    log-likelihoods ``forgetless eval`` computes (``choice_loglikelihoods``)."""
    completions = pytest.importorskip("lm_eval.models.openai_completions")
    url, _ = served
    model, tokenizer = tiny
    context = tokenizer(CONTEXT, add_special_tokens=False).input_ids
    choices = [tokenizer(text, add_special_tokens=False).input_ids for text in (" Paris", " London")]
    expected = choice_loglikelihoods(model, [context], [choices], pad_id=tokenizer.pad_token_id)[0]
    api = completions.LocalCompletionsAPI
    for choice, value in zip(choices, expected):
        payload = api._create_payload(SimpleNamespace(model="tiny-llama"), [context + choice], generate=False)
        reply = client(url).completions.create(**payload).model_dump()
        ((loglikelihood, _),) = api.parse_logprobs(reply, tokens=[context + choice], ctxlens=[len(context)])
        assert loglikelihood == pytest.approx(value, abs=1e-4)


def test_lm_evals_local_completions_model_end_to_end(served, tiny):
    """lm-eval's API model itself (it needs ``lm-eval[api]``): it finds the served tokenizer through
    /tokenizer_info and /tokenize, then scores and generates through the server."""
    pytest.importorskip("tenacity")
    pytest.importorskip("aiohttp")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    url, _ = served
    model, tokenizer = tiny
    lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="tiny-llama", max_retries=1)
    assert lm.tokenizer_backend == "remote"
    requests = [
        Instance("loglikelihood", {}, (CONTEXT, answer), i) for i, answer in enumerate([" Paris", " London"])
    ]
    scores = [value for value, _ in lm.loglikelihood(requests)]
    context = tokenizer(CONTEXT, add_special_tokens=False).input_ids
    choices = [tokenizer(text, add_special_tokens=False).input_ids for text in (" Paris", " London")]
    expected = choice_loglikelihoods(model, [context], [choices], pad_id=tokenizer.pad_token_id)[0]
    assert scores == pytest.approx(expected, abs=1e-4)
    generation = Instance("generate_until", {}, (CONTEXT, {"until": ["\n"], "max_gen_toks": 4}), 0)
    assert isinstance(lm.generate_until([generation])[0], str)
