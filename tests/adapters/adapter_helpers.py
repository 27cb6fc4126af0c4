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
