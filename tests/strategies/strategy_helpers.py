"""Small tasks built in code for the training and strategy tests."""

from __future__ import annotations

from forgetless.data import Example, Task


def make_task(name: str, multiplier: int, size: int = 12) -> Task:
    """A tiny deterministic task: ``'<name> item i?' -> '<name> code (i * multiplier mod 7)'``."""
    examples = [
        Example(prompt=f"{name} item {index}?", answer=f"{name} code {index * multiplier % 7}")
        for index in range(size)
    ]
    return Task(name=name, train=examples, test=examples[:4], metric="exact_match")


def run_killed_at_step(monkeypatch, step: int, run) -> None:  # noqa: ANN001
    """Call ``run()`` with the ``step``-th optimizer step (1-based, over all stages) raising
    KeyboardInterrupt, as a kill would; checkpoints written before it stay for a resume."""
    import pytest
    import torch

    real_step = torch.optim.AdamW.step
    count = {"n": 0}

    def dying_step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        count["n"] += 1
        if count["n"] == step:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
