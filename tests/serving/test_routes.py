"""Route reporting: a SLIM request names the route its sample-level gate chose (``base`` when it
yields, ``experts`` or ``experts:stage=N`` otherwise) in the ``x-forgetless-route`` header and the
``forgetless_route`` field, per request of a shared batch; and the ``serve`` command."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serving_helpers import GATE_TEXTS, OTHER_TEXTS, client, running_server, slim_model, wait_until

from forgetless import load_model
from forgetless.adapters import AdapterConfig, adapter_layers, inject_adapters
from forgetless.cli import main
from forgetless.serving import ROUTE_HEADER, build_engine

GENERAL = ["Hello there, how are you doing today my friend?", "Write a poem about the sea"]


def _gate_route(model, formatter, text) -> str:
    """The route of ``text`` alone, read from the gate after one forward of its prompt."""
    layer = next(iter(adapter_layers(model).values()))
    with torch.no_grad():
        model(input_ids=torch.tensor([formatter.prompt_ids(text)]))
    gate = layer.context.gate
    if float(gate.scores[0]) >= layer.config.yield_threshold:
        return "base"
    per_stage = len(getattr(layer, "earlier_experts", ())) > 0
    return f"experts:stage={int(gate.stages[0])}" if per_stage else "experts"


def _served_routes(model, tokenizer, texts, max_tokens=3):
    """Chat requests for ``texts`` decoded as one batch: (header, field, reply) per request."""
    engine = build_engine(model, tokenizer, max_batch=8, queue_size=16)
    with running_server(engine, start_worker=False) as url:
        api = client(url).chat.completions
        with ThreadPoolExecutor(len(texts)) as pool:
            futures = [
                pool.submit(
                    api.with_raw_response.create,
                    model="tiny-llama",
                    temperature=0,
                    messages=[{"role": "user", "content": text}],
                    max_tokens=max_tokens,
                )
                for text in texts
            ]
            wait_until(lambda: engine.waiting == len(texts))
            engine.start()
            raws = [future.result() for future in futures]
    assert engine.batches == 1
    return [(raw.headers[ROUTE_HEADER], raw.parse().forgetless_route, raw.parse()) for raw in raws]


def test_each_slim_request_reports_the_route_its_gate_chose():
    model, tokenizer, formatter = slim_model(threshold=0.0)  # in-domain prompts score below 0
    texts = GATE_TEXTS + GENERAL
    expected = [_gate_route(model, formatter, text) for text in texts]
    assert {"base", "experts"} <= set(expected)  # the batch mixes both routes
    served = _served_routes(model, tokenizer, texts)
    assert [header for header, _, _ in served] == [field for _, field, _ in served] == expected
    # a yielded request runs the base model's path: its reply is the plain model's
    yielded = expected.index("base")
    base, base_tokenizer = load_model("tiny-llama", seed=0)
    with running_server(build_engine(base, base_tokenizer)) as url:
        plain = client(url).chat.completions.create(
            model="tiny-llama",
            temperature=0,
            max_tokens=3,
            messages=[{"role": "user", "content": texts[yielded]}],
        )
    assert served[yielded][2].choices[0].message.content == plain.choices[0].message.content


def test_per_stage_experts_report_the_stage():
    model, tokenizer, formatter = slim_model(threshold=50.0, stages=2)  # nothing yields
    texts = GATE_TEXTS[:2] + OTHER_TEXTS[:1] + GENERAL[:1]
    expected = [_gate_route(model, formatter, text) for text in texts]
    assert {"experts:stage=0", "experts:stage=1"} <= set(expected)
    assert [header for header, _, _ in _served_routes(model, tokenizer, texts)] == expected


def test_streams_carry_the_route_header_and_field():
    model, tokenizer, _ = slim_model(threshold=-1e9)  # every request yields
    engine = build_engine(model, tokenizer, max_batch=2, queue_size=4)
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "stream": True,
    }
    with running_server(engine) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            assert response.headers[ROUTE_HEADER] == "base"
            assert '"forgetless_route": "base"' in next(response.iter_lines())


def test_models_with_adapters_but_no_gate_report_adapter():
    model, tokenizer = load_model("tiny-llama", seed=0)
    inject_adapters(model, AdapterConfig.lora(r=2), tokenizer=tokenizer)
    engine = build_engine(model, tokenizer, max_batch=2, queue_size=4)
    with running_server(engine) as url:
        raw = client(url).completions.with_raw_response.create(model="tiny-llama", prompt="Hi", max_tokens=1)
        assert raw.headers[ROUTE_HEADER] == raw.parse().forgetless_route == "adapter"


def test_serve_command_loads_like_eval_and_binds_localhost(monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    started = {}
    monkeypatch.delenv("FORGETLESS_API_KEY", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    assert main(["serve", "tiny-llama", "--name", "tiny", "--max-batch", "2"]) == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 8000)
    with TestClient(started["app"]) as http:  # runs the app's start-up: the worker starts
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]
        reply = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert reply.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--port", "70000"], "--port 70000"),
        (["--queue-size", "0"], "--queue-size 0"),
        (["--adapter", "no/such/folder"], "not an adapter folder"),
    ],
)
def test_serve_command_refuses_bad_options_with_exit_2(arguments, words, capsys):
    assert main(["serve", "tiny-llama", *arguments]) == 2
    assert words in capsys.readouterr().err


def test_rows_joining_a_slim_batch_keep_their_gate_scores_and_logits():
    from forgetless.evaluation.inference import CachedBatch

    model, tokenizer, formatter = slim_model(threshold=0.0)  # in-domain prompts run the experts
    texts = [GATE_TEXTS[0], GENERAL[0], GATE_TEXTS[1]]
    prompts = [formatter.prompt_ids(text) for text in texts]
    pad, steps = tokenizer.pad_token_id, 4
    gate = next(iter(adapter_layers(model).values())).context.gate
    solo = []
    for prompt in prompts:  # each prompt alone: its gate score and logits at every step
        rows = CachedBatch(model, [prompt], pad)
        score, logits = float(gate.scores[0]), []
        for _ in range(steps):
            logits.append(rows.logits[0].clone())
            rows.step(rows.logits.argmax(-1))
        solo.append((score, logits))
    assert solo[0][0] < 0.0 <= solo[1][0]  # an in-domain row runs the experts, a general one yields
    rows = CachedBatch(model, [prompts[0]], pad)
    seen = [[rows.logits[0].clone()]]
    rows.step(rows.logits.argmax(-1))  # the first row decodes alone for a step, then two join
    assert rows.can_join()
    routes = []
    rows.join(prompts[1:], after_prefill=lambda new: routes.append(gate.scores.tolist()))
    assert routes == [[pytest.approx(solo[1][0]), pytest.approx(solo[2][0])]]  # the new rows alone
    assert gate.scores.tolist() == pytest.approx([score for score, _ in solo])  # joined in row order
    seen[0].append(rows.logits[0].clone())
    seen += [[rows.logits[1].clone()], [rows.logits[2].clone()]]
    for _ in range(steps - 2):
        rows.step(rows.logits.argmax(-1))
        for row in range(3):
            seen[row].append(rows.logits[row].clone())
    for row, (_, logits) in enumerate(solo):
        for got, expected in zip(seen[row], logits):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
