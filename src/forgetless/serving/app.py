"""The HTTP side of ``forgetless serve``: a FastAPI app with OpenAI's chat-completions and
completions endpoints over an ``Engine``.

Endpoints: ``GET /health`` (open), ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` and, for lm-eval's ``local-completions`` model to tokenise with the
served model's own tokenizer, ``GET /tokenizer_info``, ``POST /tokenize`` and ``POST /detokenize``
(the endpoints vLLM offers for it). Every reply names the route each prompt took in the
``x-forgetless-route`` header and the ``forgetless_route`` field (routing.py). Refusals are
OpenAI error JSON: 400 bad field, 401 API key, 404 unknown model, 413 body too large, 503 queue
full. Streams are server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from forgetless.data.formatting import PromptFormatter
from forgetless.evaluation.evaluate import context_length
from forgetless.serving.decoding import TokenLogprobs
from forgetless.serving.engine import Delta, Engine, Failed, Finished, Job, Started
from forgetless.serving.prompts import Limits, chat_prompt_ids, completion_prompt_ids, sampling_for
from forgetless.serving.protocol import (
    ROUTE_HEADER,
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_choice,
    completion_choice,
    envelope,
    new_id,
    parse_request,
    usage,
)


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, read up to ``limit`` bytes (413 beyond, 400 when not JSON)."""
    too_large = ApiError(
        f"the request body is larger than this server's limit of {limit} bytes "
        "(forgetless serve --max-request-bytes); send a shorter prompt",
        status=413,
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(f"the request body is not valid JSON ({error}); send a JSON object") from None


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _outcome(job: Job) -> tuple[Started, TokenLogprobs, Finished]:
    """Wait for a job's whole reply: its start, the log-probabilities of its tokens, its end."""
    started, generated = None, TokenLogprobs()
    while True:
        event = await job.next_event()
        if isinstance(event, Failed):
            raise ApiError(event.message, status=event.status)
        if isinstance(event, Started):
            started = event
        elif isinstance(event, Delta) and event.logprobs is not None:
            generated.extend(event.logprobs)
        elif isinstance(event, Finished):
            return started, generated, event


class _Service:
    """The endpoints' shared state: engine, served name, limits, key."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits, api_key: str | None, body_limit: int):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.api_key, self.body_limit = api_key, body_limit
        self.formatter = PromptFormatter(engine.tokenizer)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.api_key):
            raise ApiError(
                "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key "
                "given to forgetless serve --api-key",
                status=401,
                code="invalid_api_key",
            )

    async def parse(self, request: Request, kind: type) -> Any:
        self.authorize(request)
        body = parse_request(kind, await read_json(request, self.body_limit))
        if body.model != self.model_name:
            raise ApiError(
                f"model: '{body.model}' is not served here; this server serves '{self.model_name}' "
                "(GET /v1/models)",
                status=404,
                param="model",
                code="model_not_found",
            )
        return body

    def submit(self, prompts: list[list[int]], sampling: Any) -> list[Job]:
        """Queue one job per prompt; called on the event loop, which receives their events."""
        loop = asyncio.get_running_loop()
        jobs = [Job(ids, sampling, loop) for ids in prompts]
        self.engine.submit(jobs)
        return jobs


def _chunks(service: _Service, job: Job, kind: str, request: Any, started: Started) -> AsyncIterator[str]:
    """The server-sent events of one streamed reply (chat or completion chunks)."""
    request_id, chat = new_id("chatcmpl" if kind == "chat" else "cmpl"), kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        text: str | None, finish: str | None, logprobs: TokenLogprobs | None = None, first: bool = False
    ) -> str:
        if chat:
            choice = chat_choice(text, finish, delta=True, first=first)
        else:
            scored = None if logprobs is None else logprobs.to_openai(service.engine.token_text)
            choice = completion_choice(0, text or "", finish, scored)
        return _sse(envelope(request_id, obj, service.model_name, started.route, [choice]))

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield chunk("", None, first=True)
            while True:
                event = await job.next_event()
                if isinstance(event, Failed):
                    yield _sse(ApiError(event.message, status=event.status).body())
                    return
                if isinstance(event, Delta) and (event.text or event.logprobs is not None):
                    yield chunk(event.text, None, event.logprobs)
                elif isinstance(event, Finished):
                    yield chunk(None if chat else "", event.finish_reason)
                    if request.include_usage():  # OpenAI's last chunk: no choices, the usage
                        final = envelope(request_id, obj, service.model_name, started.route, [])
                        final["usage"] = usage(len(job.prompt_ids), event.completion_tokens)
                        yield _sse(final)
                    yield _sse("[DONE]")
                    return
        finally:
            job.cancelled = True  # the client went away, or the reply ended: the row may leave

    return events()


async def _stream(service: _Service, job: Job, kind: str, request: Any) -> StreamingResponse:
    """Wait for the prefill (it decides the route header), then stream the reply."""
    try:
        event = await job.next_event()
    except BaseException:
        job.cancelled = True
        raise
    if isinstance(event, Failed):
        raise ApiError(event.message, status=event.status)
    return StreamingResponse(
        _chunks(service, job, kind, request, event),
        media_type="text/event-stream",
        headers={ROUTE_HEADER: event.route, "cache-control": "no-cache"},
    )


def _completion_json(service: _Service, jobs: list[Job], outcomes: list, request: CompletionRequest) -> dict:
    choices, routes, completion_tokens = [], [], 0
    for index, (job, (started, generated, finished)) in enumerate(zip(jobs, outcomes)):
        text, logprobs = finished.text, None
        prompt_text = service.engine.tokenizer.decode(job.prompt_ids) if request.echo else ""
        if request.logprobs is not None:
            scored = TokenLogprobs()
            if started.prompt_logprobs is not None:
                scored.extend(started.prompt_logprobs)
            scored.extend(generated)
            logprobs = scored.to_openai(service.engine.token_text)
        choices.append(
            completion_choice(index, prompt_text + text, finished.finish_reason, logprobs, started.route)
        )
        routes.append(started.route)
        completion_tokens += finished.completion_tokens
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
    reply = envelope(new_id("cmpl"), "text_completion", service.model_name, ",".join(routes), choices)
    return {**reply, "usage": usage(prompt_tokens, completion_tokens)}


def _routes(app: FastAPI, service: _Service) -> None:
    @app.get("/health")
    async def health() -> dict:
        engine = service.engine
        return {
            "status": "ok",
            "model": service.model_name,
            "waiting": engine.waiting,
            "running": engine.running,
            "batches": engine.batches,
            "rows": engine.rows,
            "tokens": engine.tokens,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        service.authorize(request)
        entry = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "forgetless"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await service.parse(request, ChatRequest)
        prompts = [chat_prompt_ids(service.formatter, body)]
        jobs = service.submit(prompts, sampling_for(body, prompts, service.limits))
        if body.stream:
            return await _stream(service, jobs[0], "chat", body)
        try:
            started, _, finished = await _outcome(jobs[0])
        finally:
            jobs[0].cancelled = True
        choice = chat_choice(finished.text, finished.finish_reason, delta=False)
        reply = envelope(new_id("chatcmpl"), "chat.completion", service.model_name, started.route, [choice])
        reply["usage"] = usage(len(prompts[0]), finished.completion_tokens)
        return JSONResponse(reply, headers={ROUTE_HEADER: started.route})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await service.parse(request, CompletionRequest)
        prompts = completion_prompt_ids(service.formatter, body)
        if body.stream and len(prompts) > 1:
            raise ApiError("stream: a stream serves one prompt; send one prompt per request", param="stream")
        jobs = service.submit(prompts, sampling_for(body, prompts, service.limits))
        if body.stream:
            return await _stream(service, jobs[0], "completion", body)
        try:
            outcomes = [await _outcome(job) for job in jobs]
        finally:
            for job in jobs:
                job.cancelled = True
        reply = _completion_json(service, jobs, outcomes, body)
        return JSONResponse(reply, headers={ROUTE_HEADER: reply["forgetless_route"]})

    _tokenizer_routes(app, service)


def _tokenizer_routes(app: FastAPI, service: _Service) -> None:
    """vLLM's tokenizer endpoints, which lm-eval's ``local-completions`` uses when a server has them."""
    tokenizer = service.engine.tokenizer

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict:
        service.authorize(request)
        names = ("eos_token", "bos_token", "pad_token")
        return {
            **{name: getattr(tokenizer, name, None) for name in names},
            "chat_template": tokenizer.chat_template,
            "model_max_length": service.limits.context,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        service.authorize(request)
        body = await read_json(request, service.body_limit)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ApiError("prompt: give the text to tokenise as a string", param="prompt")
        special = bool(body.get("add_special_tokens", True))
        tokens = tokenizer(body["prompt"], add_special_tokens=special).input_ids
        return {"tokens": tokens, "count": len(tokens), "max_model_len": service.limits.context}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        service.authorize(request)
        body = await read_json(request, service.body_limit)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ApiError("tokens: give a list of token ids", param="tokens")
        return {"prompt": tokenizer.decode(tokens)}


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def refused(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code == 404:
            message += "; the endpoints are /v1/models, /v1/chat/completions, /v1/completions, /health"
        return JSONResponse(ApiError(message, status=error.status_code).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:  # a bug: logged by uvicorn too
        message = f"internal error in forgetless serve: {type(error).__name__}: {error}"
        return JSONResponse(ApiError(message, status=500).body(), status_code=500)


def create_app(
    engine: Engine,
    model_name: str,
    *,
    api_key: str | None = None,
    max_tokens_limit: int = 1024,
    max_request_bytes: int = 1_000_000,
    start_worker: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``engine``'s model under ``model_name``.

    Args:
        engine: the model's worker and queue.
        model_name: the id clients send as ``model`` (``GET /v1/models`` lists it).
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer KEY``.
        max_tokens_limit: ``max_tokens`` above this is refused; the default budget of a chat reply.
        max_request_bytes: larger request bodies are refused (413).
        start_worker: start the engine's worker when the app starts (tests start it themselves);
            the worker is stopped when the app shuts down either way.
    """
    inner = engine.model.get_input_embeddings()
    limits = Limits(max_tokens_limit, context_length(engine.model), inner.num_embeddings)
    service = _Service(engine, model_name, limits, api_key, max_request_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_worker:
            engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)  # waits for the batch being decoded

    app = FastAPI(title="forgetless serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    _error_handlers(app)
    _routes(app, service)
    return app
