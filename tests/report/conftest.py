"""Fixtures for report tests: a small hand-made results dict following the results.json schema."""

from __future__ import annotations

import copy

import pytest

RESULTS = {
    "run": {"name": "demo", "model": "tiny-llama", "seed": 0},
    "tasks": ["facts", "topics", "dates"],
    "general": ["arithmetic", "capitals"],
    "methods": {
        "sequential_lora": {
            "kind": "sequential_lora",
            "stages": ["base", "facts", "topics", "dates"],
            "matrix": [[0.0, 0.25, 0.0], [1.0, 0.2, 0.05], [0.6, 1.0, 0.1], [0.4, 0.7, 1.0]],
            "general": [[0.5, 0.6], [0.45, 0.6], [0.4, 0.55], [0.35, 0.5]],
        },
        "joint": {
            "stages": ["all"],
            "matrix": [[0.0, 0.25, 0.0], [0.8, 0.9, 0.85]],
            "general": [[0.5, 0.6], [0.48, 0.58]],
        },
    },
}


@pytest.fixture()
def results():
    return copy.deepcopy(RESULTS)
