"""Two-stage sequential LoRA on tiny-llama; run directly or under ``accelerate launch``.

    python distributed_run.py OUT_DIR
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 distributed_run.py OUT_DIR

Writes ``OUT_DIR/final.safetensors`` (the weights after stage 2) and ``OUT_DIR/summaries.json``
from the main process. Used by test_distributed.py to compare one process with two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from training_helpers import make_task  # noqa: E402

from forgetless.io import save_tensors  # noqa: E402
from forgetless.training import load_stage, run_strategy  # noqa: E402

CONFIG = {
    "max_steps": 4,
    "batch_size": 4,
    "grad_accum": 2,
    "lr": 1e-2,
    "progress": False,
    "checkpoint_every": 0,
    "log_every": 1,
}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    tasks = [
        make_task("alpha", 3, size=16),
        make_task("beta", 5, size=13),
    ]  # 13: a batch smaller than the rest
    results = run_strategy("sequential_lora", {"r": 4}, "tiny-llama", tasks, CONFIG, out / "run")
    from accelerate import PartialState

    if PartialState().is_main_process:
        model, _ = load_stage(results[-1])
        save_tensors(out / "final.safetensors", model.state_dict())
        summaries = [result.summary for result in results]
        record = {"world_size": PartialState().num_processes, "summaries": summaries}
        (out / "summaries.json").write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
