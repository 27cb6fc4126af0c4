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
