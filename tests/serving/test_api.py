"""The OpenAI endpoints with the real ``openai`` client against tiny-llama served on 127.0.0.1:
replies equal evaluation's greedy generation, streams add up to the reply, and bad requests get one
clear OpenAI error naming the field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serving_helpers import client, running_server

from forgetless.data.formatting import PromptFormatter
from forgetless.evaluation.evaluate import stop_token_ids_of
from forgetless.evaluation.inference import generate_greedy
from forgetless.serving import ROUTE_HEADER, build_engine

PROMPT = "The capital of France is"


def _greedy(model, tokenizer, prompt_ids, max_tokens, stop=()):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    stops = stop_token_ids_of(model, tokenizer, PromptFormatter(tokenizer))
    return generate_greedy(
        model,
        [prompt_ids],
        decode,
        max_new_tokens=max_tokens,
        pad_id=tokenizer.pad_token_id,
        stop_token_ids=stops,
        stop=stop,
    )[0]


def test_models_and_health(served):
    url, _ = served
    assert [model.id for model in client(url).models.list().data] == ["tiny-llama"]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-llama"


def test_chat_reply_is_evaluations_greedy_reply(served, tiny):
    url, _ = served
    model, tokenizer = tiny
    raw = client(url).chat.completions.with_raw_response.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hi there"}], max_tokens=6, temperature=0
    )
    reply = raw.parse()
    prompt_ids = PromptFormatter(tokenizer).prompt_ids("Hi there")  # what forgetless eval feeds
    expected = _greedy(model, tokenizer, prompt_ids, 6)
    assert reply.choices[0].message.content.strip() == expected.text
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids) == 6
    assert reply.choices[0].finish_reason == "length"
    assert raw.headers[ROUTE_HEADER] == reply.forgetless_route == "base"


def test_completion_from_text_and_from_token_ids(served, tiny):
    url, _ = served
    model, tokenizer = tiny
    ids = tokenizer(PROMPT).input_ids
    expected = _greedy(model, tokenizer, ids, 5)
    api = client(url)
    from_text = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0)
    from_ids = api.completions.create(model="tiny-llama", prompt=ids, max_tokens=5, temperature=0)
    assert from_text.choices[0].text == from_ids.choices[0].text
    assert from_text.choices[0].text.strip() == expected.text
    assert from_text.usage.prompt_tokens == len(ids) and from_text.usage.completion_tokens == 5


def test_several_prompts_get_one_choice_each_in_order(served):
    url, _ = served
    api = client(url)
    prompts = [PROMPT, "Hello", "One two three"]
    both = api.completions.create(model="tiny-llama", prompt=prompts, max_tokens=3, temperature=0)
    alone = [
        api.completions.create(model="tiny-llama", prompt=p, max_tokens=3, temperature=0) for p in prompts
    ]
    assert [c.index for c in both.choices] == [0, 1, 2]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    assert both.forgetless_route == "base,base,base"


def test_stop_string_cuts_the_reply(served):
    url, _ = served
    api = client(url)
    free = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0).choices[0]
    stop = free.text[len(free.text) // 2 :][:3]  # a piece of the reply's second half
    cut = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == free.text[: free.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streams_add_up_to_the_reply(served):
    url, _ = served
    api = client(url)
    messages = [{"role": "user", "content": "Name a colour"}]
    whole = api.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, temperature=0)
    chunks = list(
        api.chat.completions.create(
            model="tiny-llama",
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].forgetless_route == "base"

    whole = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0)
    pieces = list(
        api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text


def test_a_stream_is_server_sent_events_ending_with_done(served):
    url, _ = served
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers[ROUTE_HEADER] == "base"
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length" and last["object"] == "text_completion"


def test_a_seed_makes_sampling_reproducible(served):
    url, _ = served
    api = client(url)
    ask = dict(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=1.5, seed=11)
    first, second = (api.completions.create(**ask).choices[0].text for _ in range(2))
    assert first == second
    greedy = api.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0)
    nucleus = api.completions.create(**{**ask, "top_p": 1e-6})  # only the likeliest token is left
    assert nucleus.choices[0].text == greedy.choices[0].text


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"max_tokens": 65}, 400, "max_tokens: 65 is above this server's limit of 64"),
        ({"n": 2}, 400, "n: only n=1"),
        ({"temperature": 3}, 400, "temperature"),
        ({"model": "gpt-4"}, 404, "'gpt-4' is not served here; this server serves 'tiny-llama'"),
        ({"prompt": "word " * 1100}, 400, "the model's context is 1024 tokens"),
        ({"prompt": [[5, 10**9]]}, 400, "token id 1000000000 is outside the model's vocabulary"),
        ({"prompt": "x" * 30_000}, 413, "larger than this server's limit of 20000 bytes"),
        ({"echo": True, "stream": True}, 400, "echo"),
    ],
)
def test_bad_requests_get_one_clear_error(served, change, status, words):
    url, _ = served
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, **change}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"]


def test_malformed_json_and_unknown_paths(served):
    url, _ = served
    response = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": ', timeout=60)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.get(f"{url}/v1/engines", timeout=60)
    assert response.status_code == 404 and "/v1/chat/completions" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="messages"):
        client(url).chat.completions.create(model="tiny-llama", messages=[], max_tokens=2)


def test_api_key_is_required_when_set(tiny):
    engine = build_engine(*tiny, max_batch=2, queue_size=4)
    with running_server(engine, api_key="sesame") as url:
        with pytest.raises(openai.AuthenticationError, match="Authorization: Bearer"):
            client(url, api_key="wrong").models.list()
        response = httpx.post(
            f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "x"}, timeout=60
        )
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200  # health stays open
        reply = client(url, api_key="sesame").completions.create(model="tiny-llama", prompt="x", max_tokens=2)
        assert reply.usage.completion_tokens == 2
