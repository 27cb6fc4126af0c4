"""Serving what forgetless trains: an OpenAI-compatible HTTP server (``forgetless serve``).

    from forgetless.serving import build_engine, create_app
    engine = build_engine(model, tokenizer, max_batch=8)      # worker thread + bounded queue
    app = create_app(engine, "my-model", api_key="secret")    # FastAPI: /v1/chat/completions ...
    uvicorn.run(app, host="127.0.0.1", port=8000)             # or forgetless.serving.serve(spec)

protocol.py holds the wire format, prompts.py turns requests into token ids and sampling settings,
engine.py batches requests on the model's KV cache, decoding.py picks tokens and measures
log-probabilities, routing.py names the route (base / experts) each request took.
"""

from forgetless.serving.app import create_app
from forgetless.serving.engine import Engine
from forgetless.serving.protocol import ROUTE_HEADER, ApiError
from forgetless.serving.server import background_server, build_engine, serve

__all__ = ["ROUTE_HEADER", "ApiError", "Engine", "background_server", "build_engine", "create_app", "serve"]
