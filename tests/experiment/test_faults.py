"""Faults: a run killed with SIGKILL at ten seeded points resumes to the same tensors and results as
an uninterrupted run, and a write that fails (a full disk) leaves what was written intact and says
so in one line."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

CONFIG = {
    "name": "faults",
    "model": "tiny-llama",
    "seed": 0,
    "tasks": ["kelvar_dates", "zorbian_topics"],
    "limits": {"train": 8, "test": 3},
    "train": {"epochs": 1, "batch_size": 4, "max_length": 48, "checkpoint_every": 1},
    "methods": [
        {"name": "seq_lora", "strategy": "sequential_lora", "params": {"r": 2, "alpha": 4}},
        # SLIM's defaults: sample-level gate, per-task statistics, per-stage experts
        {"name": "slim", "strategy": "slim", "params": {"r": 2, "alpha": 4, "num_experts": 2, "top_k": 1}},
        {"name": "one_round", "strategy": "one_round", "params": {"r": 2, "alpha": 4}, "evaluate": False},
        {"name": "avg", "merge": {"method": "average", "source": "one_round"}},
    ],
    "evaluation": {"general": ["general_commonsense"], "general_limit": 3, "batch_size": 4},
}
KILL_POINTS = 10


def _cli(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "forgetless.cli", "run", str(config), "--out", str(out), "--no-report"]


def _without_timings(value):  # noqa: ANN001, ANN202
    """results.json minus wall-clock fields (``seconds``), which no two runs share."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every saved tensor of a run, by file (relative path) and key."""
    return {
        str(path.relative_to(run)): load_file(str(path))
        for path in sorted(run.rglob("*.safetensors"))
        if not any(part.startswith(".tmp-") for part in path.relative_to(run).parts)
    }


def _files(run: Path) -> int:
    """How many files a run folder holds (temporary ones included): the run's progress. os.walk
    skips folders that vanish while it reads (a finished atomic write renames its temporary one)."""
    return sum(len(files) for _, _, files in os.walk(run))


def _kill_at(config: Path, out: Path, threshold: int) -> bool:
    """Start the run and SIGKILL it once its folder holds ``threshold`` files. The kill point is an
    event of the run, not a wall-clock time, so it lands at the same place on a fast machine and a
    slow one. Returns whether the kill happened (False if the run finished first)."""
    process = subprocess.Popen(_cli(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and _files(out) < threshold:
        time.sleep(0.005)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return killed


@pytest.mark.slow
def test_ten_kills_at_seeded_points_resume_to_the_same_tensors_and_results(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    reference = tmp_path / "reference"
    subprocess.run(_cli(config, reference), check=True, capture_output=True)
    total = _files(reference)
    expected_results = _without_timings(json.loads((reference / "results.json").read_text()))
    expected_tensors = _tensors(reference)
    assert len(expected_tensors) >= 8  # adapters of both stages of three methods, merged models
    rng = random.Random(0)
    kills = 0
    for attempt in range(KILL_POINTS // 2):
        out = tmp_path / f"killed-{attempt}"
        # two kills at seeded points of the run's progress, the second later than the first
        first = rng.randint(1, total // 2)
        for threshold in (first, rng.randint(first + 1, total - 2)):
            kills += _kill_at(config, out, max(threshold, _files(out) + 1))
        subprocess.run(_cli(config, out), check=True, capture_output=True)
        assert _without_timings(json.loads((out / "results.json").read_text())) == expected_results
        tensors = _tensors(out)
        assert tensors.keys() == expected_tensors.keys()
        for name, saved in tensors.items():
            assert saved.keys() == expected_tensors[name].keys(), name
            for key, tensor in saved.items():
                assert torch.equal(tensor, expected_tensors[name][key]), f"{name}: {key}"
    assert kills == KILL_POINTS


def test_a_full_disk_keeps_the_finished_stages_and_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from forgetless.cli import main

    config = tmp_path / "run.yaml"
    one = dict(CONFIG, methods=CONFIG["methods"][:1])
    config.write_text(yaml.safe_dump(one))
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--no-report"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".forgetless.lock"}
    config.write_text(yaml.safe_dump(dict(CONFIG, methods=CONFIG["methods"][:2])))  # slim must write now
    capsys.readouterr()

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]) if args else None)

    monkeypatch.setattr(os, "replace", full)  # every atomic write fails at its rename
    code = main(["run", str(config), "--out", str(out), "--no-report"])
    monkeypatch.undo()
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert [line for line in error if line.startswith("forgetless: error:")] == error[-1:]
    assert "No space left on device" in error[-1] and "re-run" in error[-1]
    assert not any("Traceback" in line for line in error)
    for path, content in before.items():  # every finished artifact is intact
        assert path.read_bytes() == content, path
    assert main(["run", str(config), "--out", str(out), "--no-report"]) == 0  # and it resumes
