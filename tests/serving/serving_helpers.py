"""Helpers shared by the server tests (imported by name: tests/serving is on sys.path)."""

from __future__ import annotations

import time

import torch

GATE_TEXTS = ["zorb the glorp twice", "what does kelvar mean", "glorp 3 and 4", "name the zorbian topic"]
OTHER_TEXTS = ["What is the capital of Peru?", "Name the capital of Chile.", "Capital of Spain?"]


def running_server(engine, name: str = "tiny-llama", start_worker: bool = True, **options):
    """Serve ``engine`` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    from forgetless.serving import background_server

    return background_server(engine, name, start_worker=start_worker, **options)


def client(url: str, api_key: str = "unused"):
    """The openai client on a test server: no retries (a 503 must reach the test)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the server")
        time.sleep(0.01)


def train_gate(model, formatter, texts) -> None:
    """A few train-mode passes so the gate's clusters and moments learn ``texts``' prompts."""
    from forgetless.adapters.gate import prompt_boundary

    model.train()
    with torch.no_grad():
        for _ in range(3):
            for text in texts:
                prompt = formatter.prompt_ids(text)
                ids = torch.tensor([prompt + [11, 12, 13]])
                with prompt_boundary(model, torch.tensor([[True] * len(prompt) + [False] * 3])):
                    model(input_ids=ids)
    model.eval()


def randomize_adapters(model, seed: int, scale: float) -> None:
    """Random adapter weights (a fresh LoRA B is zero, which would hide the experts' effect)."""
    from forgetless.adapters import trainable_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in trainable_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def slim_model(threshold: float, stages: int = 1):
    """tiny-llama with SLIM's sample-level gate; with ``stages=2`` per-stage experts, the second
    stage's gate trained on other prompts. Returns (model, tokenizer, formatter)."""
    from forgetless import load_model
    from forgetless.adapters import AdapterConfig, inject_adapters, open_gate_task
    from forgetless.data.formatting import PromptFormatter

    model, tokenizer = load_model("tiny-llama", seed=0)
    fields = {"stage_experts": "per_task"} if stages > 1 else {}
    config = AdapterConfig.slim(r=4, num_experts=3, yield_threshold=threshold, **fields)
    inject_adapters(model, config, tokenizer=tokenizer)
    randomize_adapters(model, seed=3, scale=0.3)
    formatter = PromptFormatter(tokenizer)
    train_gate(model, formatter, GATE_TEXTS)
    if stages > 1:
        open_gate_task(model)
        randomize_adapters(model, seed=4, scale=0.3)
        train_gate(model, formatter, OTHER_TEXTS)
    return model, tokenizer, formatter
