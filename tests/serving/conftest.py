"""Fixtures for the server tests: tiny-llama served by uvicorn on a free 127.0.0.1 port in a
background thread (serving_helpers.running_server), for the real ``openai`` client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest imports test modules in importlib mode: the shared helpers are imported by name from here
sys.path.insert(0, str(Path(__file__).parent))

pytest.importorskip("openai")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): tiny-llama, seed 0, shared by a module's tests (serving never trains it)."""
    from forgetless import load_model

    return load_model("tiny-llama", seed=0)


@pytest.fixture(scope="module")
def served(tiny):
    """(base URL, engine) of one server over ``tiny`` shared by a module's tests."""
    from serving_helpers import running_server

    from forgetless.serving import build_engine

    engine = build_engine(*tiny, max_batch=8, queue_size=16)
    with running_server(engine, max_tokens_limit=64, max_request_bytes=20_000) as url:
        yield url, engine
