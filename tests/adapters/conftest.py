"""Fixtures for the adapter tests: both tiny architectures, and a fixed token batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# pytest runs in importlib mode, which puts no test folder on sys.path; the shared helpers
# (adapter_helpers.py, a name no other folder uses) are imported by name from here.
sys.path.insert(0, str(Path(__file__).parent))

from forgetless import load_model

ARCHITECTURES = ["tiny-llama", "tiny-gemma3"]


@pytest.fixture(params=ARCHITECTURES)
def tiny(request):
    """(model, alias) for each tiny architecture, freshly built (seed 0) for every test."""
    model, _ = load_model(request.param, seed=0)
    return model, request.param


@pytest.fixture()
def batch():
    """Token ids (2 x 12) and an attention mask with one padded position."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, 2000, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -1] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
