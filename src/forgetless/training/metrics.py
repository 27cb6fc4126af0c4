"""What a training stage reports while it runs: metrics.jsonl (+ TensorBoard) and a progress bar."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed) in the stage folder; main process only."""

    def __init__(self, folder: Path | None, resume_step: int, enabled: bool) -> None:
        self.path = folder / METRICS_FILE if folder is not None and enabled else None
        self.writer = None
        if self.path is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop lines logged after the checkpoint we resume from
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            from forgetless.io import write_text

            write_text(self.path, "".join(line + "\n" for line in kept))
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(total: int, initial: int, description: str, enabled: bool) -> Any:  # a tqdm bar
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, disable=not enabled, dynamic_ncols=True)
