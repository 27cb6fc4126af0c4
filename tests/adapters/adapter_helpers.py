"""Helpers shared by the adapter tests (imported by name: tests/adapters is on sys.path)."""

from __future__ import annotations

import torch


def randomize_adapters(model, seed: int = 1, scale: float = 0.5) -> None:
    """Give every adapter parameter random values (fresh LoRA B is zero, which hides bugs)."""
    from forgetless.adapters import trainable_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in trainable_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def recompute_greedy(model, prompt, steps, stop_ids) -> list[int]:
    """Greedy decoding without a cache: every step runs prompt + reply again, the prompt marked
    with ``prompt_boundary`` (a no-op for models without the sample-level gate)."""
    from forgetless.adapters.gate import prompt_boundary

    row = list(prompt)
    for _ in range(steps):
        boundary = torch.tensor([[True] * len(prompt) + [False] * (len(row) - len(prompt))])
        with torch.no_grad(), prompt_boundary(model, boundary):
            token = int(model(input_ids=torch.tensor([row])).logits[0, -1].argmax())
        if token in stop_ids:
            break
        row.append(token)
    return row[len(prompt) :]


def train_gate(model, formatter, texts) -> None:
    """Gate passes in train mode (what a training stage does to the gate's statistics): three
    passes over each text's prompt plus two answer tokens, the prompt marked."""
    from forgetless.adapters.gate import prompt_boundary

    model.train()
    with torch.no_grad():
        for _ in range(3):
            for text in texts:
                prompt = formatter.prompt_ids(text)
                ids = torch.tensor([prompt + [11, 12]])
                with prompt_boundary(model, torch.tensor([[True] * len(prompt) + [False] * 2])):
                    model(input_ids=ids)
    model.eval()
