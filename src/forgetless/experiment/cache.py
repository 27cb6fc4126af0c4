"""Evaluation results cached on disk, keyed by what decides them.

Each evaluated (method, stage) writes one JSON file ``eval-<key>.json`` in its folder, where the
key hashes the model identity (base model, method config, stage), the task fingerprints and the
evaluation settings. Re-running the same config finds the file and skips the evaluation; any
change to those inputs gives a new key, so a stale score is never reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgetless.io import read_json, write_json


class EvalCache:
    """Get / put evaluation rows under ``folder``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"eval-{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return read_json(path)
        except (OSError, ValueError):
            return None  # a damaged cache entry is recomputed, never trusted

    def put(self, key: str, row: dict[str, Any]) -> None:
        write_json(self.path(key), row)
