"""Two CPU processes under ``accelerate launch`` give the single-process result.

``accelerate launch --cpu --num_processes 2`` starts *one* process unless MPI is installed
(accelerate 1.15's CPU launcher is mpirun); the torchrun-based launcher with ``ACCELERATE_USE_CPU``
starts two gloo processes on any machine, so that is what this test runs (and checks: world size 2).

``batch_size`` is global: each process takes every second example of a micro-batch, DDP averages
the gradients and the loss is normalised by the answer tokens of the whole step, so the only
difference from one process is the order of float summation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("distributed_run.py")


def _run(command: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["ACCELERATE_USE_CPU"] = "true"
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert launcher is not None, "the accelerate command is installed with accelerate"
    single, double = tmp_path / "single", tmp_path / "double"
    _run([sys.executable, str(SCRIPT), str(single)], tmp_path)
    _run(
        [
            launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
            str(SCRIPT), str(double),
        ],
        tmp_path,
    )  # fmt: skip
    one, two = load_file(single / "final.safetensors"), load_file(double / "final.safetensors")
    assert one.keys() == two.keys()
    changed = [key for key in one if "mlp" in key]
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key
    one_record = json.loads((single / "summaries.json").read_text())
    two_record = json.loads((double / "summaries.json").read_text())
    assert (one_record["world_size"], two_record["world_size"]) == (1, 2)
    one_summary, two_summary = one_record["summaries"], two_record["summaries"]
    for a, b in zip(one_summary, two_summary):
        assert a["steps"] == b["steps"] == 4 and a["tokens"] == b["tokens"]
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)
    # the gradient norms (after DDP's averaging) match too: Adam's update hides a gradient scale
    # error from the weights, the norm does not
    for stage in ("stage-0-alpha", "stage-1-beta"):
        norms = []
        for run in (single, double):
            lines = (run / "run" / stage / "metrics.jsonl").read_text().splitlines()
            norms.append([json.loads(line)["grad_norm"] for line in lines])
        assert len(norms[0]) == 4 and norms[1] == pytest.approx(norms[0], rel=1e-4)
    # and the run did train: the merged MLP weights differ from the base model's
    from forgetless import load_model

    base = load_model("tiny-llama")[0].state_dict()
    assert any(not torch.allclose(one[key], base[key]) for key in changed)
