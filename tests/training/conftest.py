"""Fixtures: two small tasks built in code, a fast training config, one torch thread.

Tiny models run fastest on one thread, and on a machine shared with other jobs two OpenMP threads
can be 100x slower than one (spinning barriers); the fixture restores the caller's setting.
"""

from __future__ import annotations

import pytest
import torch
from training_helpers import make_task

from forgetless.data import Task


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def two_tasks() -> list[Task]:
    return [make_task("alpha", 3), make_task("beta", 5, size=8)]


@pytest.fixture()
def fast_config() -> dict:
    """Three optimizer steps of 4 examples: enough to move the weights, seconds on CPU."""
    return {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 1}
