"""Fixtures for the export tests: one torch thread, and the export helpers on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# pytest runs in importlib mode: the shared helpers (export_helpers.py) are imported by name from here
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
