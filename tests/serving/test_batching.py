"""Dynamic batching: concurrent requests decode as one batch and get exactly evaluation's greedy
replies; a full queue answers 503; a client leaving mid-stream frees its row; a shutdown lets the
requests in flight finish."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from serving_helpers import client, running_server, wait_until

from forgetless import load_model
from forgetless.data.formatting import PromptFormatter
from forgetless.evaluation.evaluate import stop_token_ids_of
from forgetless.evaluation.inference import generate_greedy
from forgetless.serving import ApiError, build_engine

TEXTS = [
    "Hello there, how are you doing today my friend?",
    "Hi",
    "The capital of France is a city that",
    "glorp 3 and 4",
    "Name a colour",
    "One two three four five six",
]
BUDGETS = [2, 7, 4, 9, 1, 5]  # rows finish at different steps and leave the batch


def _expected(model, tokenizer, prompt_ids, budget):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    stops = stop_token_ids_of(model, tokenizer, PromptFormatter(tokenizer))
    return generate_greedy(
        model,
        [prompt_ids],
        decode,
        max_new_tokens=budget,
        pad_id=tokenizer.pad_token_id,
        stop_token_ids=stops,
    )[0]


def test_concurrent_greedy_requests_batch_together_and_equal_generate_greedy(tiny):
    model, tokenizer = tiny
    engine = build_engine(model, tokenizer, max_batch=8, queue_size=16)
    formatter = PromptFormatter(tokenizer)
    with running_server(engine, start_worker=False) as url:
        api = client(url)
        with ThreadPoolExecutor(len(TEXTS)) as pool:
            futures = []
            for index, (text, budget) in enumerate(zip(TEXTS, BUDGETS)):
                if index % 3 == 2:  # chat and completion requests share the batch
                    messages = [{"role": "user", "content": text}]
                    futures.append(
                        pool.submit(
                            api.chat.completions.create,
                            model="tiny-llama",
                            messages=messages,
                            max_tokens=budget,
                            temperature=0,
                        )
                    )
                else:
                    futures.append(
                        pool.submit(
                            api.completions.create,
                            model="tiny-llama",
                            prompt=text,
                            max_tokens=budget,
                            temperature=0,
                        )
                    )
            wait_until(lambda: engine.waiting == len(TEXTS))  # all queued before the worker starts
            engine.start()
            replies = [future.result() for future in futures]
    assert (engine.batches, engine.rows) == (1, len(TEXTS))  # one batch of all six
    for index, (text, budget, reply) in enumerate(zip(TEXTS, BUDGETS, replies)):
        chat = index % 3 == 2
        prompt_ids = formatter.prompt_ids(text) if chat else tokenizer(text).input_ids
        expected = _expected(model, tokenizer, prompt_ids, budget)
        got = reply.choices[0].message.content if chat else reply.choices[0].text
        assert got.strip() == expected.text
        assert reply.usage.completion_tokens == len(expected.token_ids)


def _three_while_one_decodes(engine, url):
    """Stream a long reply and, once it decodes, send three short requests; returns their replies."""
    long = {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 1000, "stream": True, "temperature": 0}
    api = client(url)
    with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as response:
        lines = response.iter_lines()  # (kept: a dropped iterator closes the response)
        next(lines)  # the long request is decoding
        with ThreadPoolExecutor(3) as pool:
            futures = [
                pool.submit(
                    api.completions.create, model="tiny-llama", prompt=text, max_tokens=budget, temperature=0
                )
                for text, budget in zip(TEXTS[:3], BUDGETS[:3])
            ]
            if not engine_joins(engine):
                wait_until(lambda: engine.waiting == 3)  # they wait for the running batch
                response.close()  # its client leaves: the batch ends, the three decode together
            return [future.result() for future in futures]


def engine_joins(engine) -> bool:
    return engine.model.config.model_type == "llama"


def test_requests_arriving_while_a_batch_decodes_join_it(tiny):
    model, tokenizer = tiny
    engine = build_engine(model, tokenizer, max_batch=8, queue_size=16)
    with running_server(engine, max_tokens_limit=1000) as url:
        replies = _three_while_one_decodes(engine, url)
        assert engine.batches == 1 and engine.rows == 4  # they joined the running batch
    for text, budget, reply in zip(TEXTS, BUDGETS, replies):
        expected = _expected(model, tokenizer, tokenizer(text).input_ids, budget)
        assert reply.choices[0].text.strip() == expected.text


def test_a_model_whose_cache_cannot_join_serves_arrivals_in_the_next_batch():
    model, tokenizer = load_model("tiny-gemma3", seed=0)  # sliding-window cache layers
    engine = build_engine(model, tokenizer, max_batch=8, queue_size=16)
    with running_server(engine, max_tokens_limit=1000) as url:
        replies = _three_while_one_decodes(engine, url)
    assert (engine.batches, engine.rows) == (2, 4)
    for text, budget, reply in zip(TEXTS, BUDGETS, replies):
        expected = _expected(model, tokenizer, tokenizer(text).input_ids, budget)
        assert reply.choices[0].text.strip() == expected.text


def test_a_full_queue_answers_503_with_a_message(tiny):
    engine = build_engine(*tiny, max_batch=1, queue_size=1)
    with running_server(engine, start_worker=False) as url:  # a worker that takes nothing yet
        api = client(url)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(api.completions.create, model="tiny-llama", prompt="Hello", max_tokens=2)
            wait_until(lambda: engine.waiting == 1)
            with pytest.raises(
                openai.InternalServerError, match="queue of 1 waiting requests is full"
            ) as refused:
                api.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2)
            assert refused.value.status_code == 503
            engine.start()
            assert waiting.result().usage.completion_tokens == 2  # the queued request is served


def test_a_client_leaving_mid_stream_frees_its_row_and_the_server_goes_on(tiny):
    engine = build_engine(*tiny, max_batch=4, queue_size=4)
    with running_server(engine, max_tokens_limit=1000) as url:
        body = {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 1000, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the reply has started; now the client leaves
        wait_until(lambda: engine.running == 0)
        assert engine.tokens < 1000, engine.tokens  # the row left the batch when its client went away
        reply = client(url).completions.create(model="tiny-llama", prompt="Hi", max_tokens=3)
        assert reply.usage.completion_tokens == 3


def test_shutdown_lets_the_request_in_flight_finish(tiny):
    engine = build_engine(*tiny, max_batch=2, queue_size=4)
    results = {}
    with running_server(engine, max_tokens_limit=200) as url:
        api = client(url)

        def ask():
            results["reply"] = api.completions.create(model="tiny-llama", prompt="Hi", max_tokens=200)

        thread = threading.Thread(target=ask)
        thread.start()
        wait_until(lambda: engine.running == 1)
    # the server has shut down (the block's end waits for it): the request it was decoding finished
    thread.join(30)
    assert results["reply"].usage.completion_tokens == 200
    with pytest.raises(ApiError, match="shutting down"):
        engine.submit([])  # the worker is stopped and refuses new work


def test_a_batch_that_rows_keep_joining_drops_the_padding_its_departed_rows_left(tiny):
    from forgetless.evaluation.inference import CachedBatch

    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    long, short, joining = (tokenizer(text).input_ids for text in ("word " * 30, "Hi", "Name a colour"))

    def solo(prompt, steps):
        rows, logits = CachedBatch(model, [prompt], pad), []
        for _ in range(steps):
            logits.append(rows.logits[0].clone())
            rows.step(rows.logits.argmax(-1))
        return logits

    expected_short, expected_joining = solo(short, 6), solo(joining, 3)
    rows = CachedBatch(model, [long, short], pad)
    seen_short = []
    for _ in range(3):
        seen_short.append(rows.logits[1].clone())
        rows.step(rows.logits.argmax(-1))
    rows.keep([1])  # the long row leaves; its prompt's columns are padding in every row left
    rows.join([joining])
    width = max(len(short) + 3, len(joining))
    assert rows.attention_mask.shape[1] == width == rows.cache.get_seq_length()
    seen_joining = []
    for _ in range(3):
        seen_short.append(rows.logits[0].clone())
        seen_joining.append(rows.logits[1].clone())
        rows.step(rows.logits.argmax(-1))
    for got, expected in zip(seen_short + seen_joining, expected_short + expected_joining):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_batch_that_fails_fails_the_requests_that_joined_it(tiny, monkeypatch):
    from forgetless.evaluation.inference import CachedBatch

    original = CachedBatch.step

    def failing_step(self, tokens):
        if len(self) >= 2:  # once a request has joined the running one
            raise RuntimeError("the device went away")
        return original(self, tokens)

    monkeypatch.setattr(CachedBatch, "step", failing_step)
    engine = build_engine(*tiny, max_batch=8, queue_size=16)
    long = {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 1000, "stream": True, "temperature": 0}
    with running_server(engine, max_tokens_limit=1000) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)  # the long request is decoding
            with pytest.raises(openai.InternalServerError, match="the device went away"):
                client(url).completions.create(model="tiny-llama", prompt="Name a colour", max_tokens=5)
            assert any("the device went away" in line for line in lines)  # the running one fails too
        reply = client(url).completions.create(model="tiny-llama", prompt="Hi", max_tokens=3)
        assert reply.usage.completion_tokens == 3  # the server goes on
