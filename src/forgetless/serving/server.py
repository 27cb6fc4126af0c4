"""``forgetless serve``: load a model spec as ``forgetless eval`` does and serve it with uvicorn."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from torch import nn
from transformers import PreTrainedTokenizerBase

from forgetless.data.formatting import PromptFormatter
from forgetless.errors import InputError
from forgetless.evaluation.evaluate import stop_token_ids_of
from forgetless.evaluation.run import load_model_and_adapter
from forgetless.serving.app import create_app
from forgetless.serving.engine import Engine


def build_engine(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_batch: int = 8, queue_size: int = 64
) -> Engine:
    """An ``Engine`` for ``model`` whose replies stop where evaluation's do (EOS and end of turn)."""
    stops = stop_token_ids_of(model, tokenizer, PromptFormatter(tokenizer))
    return Engine(model, tokenizer, stops, max_batch=max_batch, queue_size=queue_size)


def check_options(
    port: int, max_batch: int, queue_size: int, max_tokens_limit: int, max_request_bytes: int
) -> None:
    """Refuse impossible options before the model loads (one line each, naming the option)."""
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port}: give a port in 1..65535")
    for option, value in (
        ("--max-batch", max_batch),
        ("--queue-size", queue_size),
        ("--max-tokens-limit", max_tokens_limit),
        ("--max-request-bytes", max_request_bytes),
    ):
        if value < 1:
            raise InputError(f"{option} {value}: give a whole number >= 1")


def serve(
    model_spec: str,
    adapter: str | os.PathLike | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    name: str | None = None,
    max_batch: int = 8,
    queue_size: int = 64,
    max_tokens_limit: int = 1024,
    max_request_bytes: int = 1_000_000,
    dtype: str = "float32",
    seed: int = 0,
) -> int:
    """Load ``model_spec`` (+ ``adapter``) with ``forgetless eval``'s loader and serve it until
    interrupted. Returns the exit code (0)."""
    check_options(port, max_batch, queue_size, max_tokens_limit, max_request_bytes)
    model, tokenizer = load_model_and_adapter(model_spec, adapter, dtype=dtype, seed=seed)
    engine = build_engine(model, tokenizer, max_batch=max_batch, queue_size=queue_size)
    served = name or str(model_spec)
    app = create_app(
        engine,
        served,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        max_request_bytes=max_request_bytes,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"forgetless serve: warning: listening on {host} without --api-key", file=sys.stderr)
    print(
        f"forgetless serve: '{served}' on http://{host}:{port}/v1 (route: {engine.routes.summary()})",
        file=sys.stderr,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0


@contextmanager
def background_server(
    engine: Engine, name: str, start_worker: bool = True, **options: object
) -> Iterator[str]:
    """Serve ``engine`` as ``name`` on 127.0.0.1 (a free port) on a thread while the block runs;
    yields the base URL (``http://127.0.0.1:PORT``). ``options`` go to ``create_app``. For tests,
    benchmarks and notebooks; ``serve`` is the command-line server."""
    app = create_app(engine, name, start_worker=start_worker, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start within 20 s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
