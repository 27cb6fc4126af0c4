"""Shared fixtures: tiny random models (seconds on CPU) and the SmolLM2 tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(scope="session")
def tokenizer():
    from forgetless.models import smollm2_tokenizer

    return smollm2_tokenizer()


@pytest.fixture()
def tiny_llama():
    from forgetless import load_model

    return load_model("tiny-llama", seed=0)


@pytest.fixture(scope="session")
def default_model():
    """The real embedded SmolLM2-135M-Instruct (converted once into the cache)."""
    from forgetless import load_model

    return load_model("smollm2-135m-instruct")
