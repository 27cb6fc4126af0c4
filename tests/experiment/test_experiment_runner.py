"""The experiment runner end to end on tiny models: results, resume, lock, kill-and-resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgetless.config import validate_config
from forgetless.errors import InputError
from forgetless.experiment.lock import LOCK_NAME, run_lock
from forgetless.experiment.runner import run_experiment

CONFIG = {
    "name": "tiny",
    "model": "tiny-llama",
    "seed": 0,
    "tasks": ["kelvar_dates", "zorbian_topics"],
    "limits": {"train": 8, "test": 3},
    "train": {"epochs": 1, "batch_size": 4, "max_length": 48, "checkpoint_every": 1},
    "methods": [
        {"name": "seq_lora", "strategy": "sequential_lora", "params": {"r": 2, "alpha": 4}},
        {"name": "one_round", "strategy": "one_round", "params": {"r": 2, "alpha": 4}, "evaluate": False},
        {"name": "avg", "merge": {"method": "average", "source": "one_round"}},
    ],
    "evaluation": {"general": ["general_commonsense"], "general_limit": 3, "batch_size": 4},
}


def scores(results):
    return {name: (entry["matrix"], entry["general"]) for name, entry in results["methods"].items()}


def test_run_writes_matrices_and_resumes(tmp_path):
    config = validate_config(CONFIG)
    results = run_experiment(config, tmp_path / "run")
    assert set(results["methods"]) == {"seq_lora", "avg"}  # one_round is a source, not evaluated
    for entry in results["methods"].values():
        assert len(entry["matrix"]) == 3 and len(entry["matrix"][0]) == 2  # base + 2 stages, 2 tasks
        assert entry["matrix"][0] == results["methods"]["seq_lora"]["matrix"][0]  # one shared base row
        assert "bwt" in entry["metrics"] and "retention" in entry["metrics"]
        # every cell is the mean of its items' outcomes, kept per row and task
        for row, items, general in zip(entry["matrix"], entry["items"], entry["general"]):
            for name, value in zip(results["tasks"] + results["general"], row + general):
                assert len(items[name]["score"]) == len(items[name]["prediction"]) == 3
                assert sum(items[name]["score"]) / 3 == pytest.approx(value)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert scores(saved) == scores(results)
    start = time.perf_counter()
    again = run_experiment(config, tmp_path / "run")
    assert scores(again) == scores(results)
    assert time.perf_counter() - start < 60  # nothing retrained (behaviour, generous bound)
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_moved_run_reuses_every_cached_score(tmp_path):
    import shutil

    config = validate_config(CONFIG)
    results = run_experiment(config, tmp_path / "run")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    evaluations = sorted(p.relative_to(tmp_path / "moved") for p in (tmp_path / "moved").rglob("eval-*.json"))
    logged = []
    again = run_experiment(config, tmp_path / "moved", log=logged.append)
    assert scores(again) == scores(results)
    assert not [line for line in logged if line.startswith("evaluating")]  # merges included
    assert (
        sorted(p.relative_to(tmp_path / "moved") for p in (tmp_path / "moved").rglob("eval-*.json"))
        == evaluations
    )


def test_second_run_on_the_same_folder_is_refused(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(InputError, match="in use by another forgetless run"):
            with run_lock(tmp_path):
                pass
    # a lock left by a dead process is taken over
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999_999_999, "host": os.uname().nodename}))
    with run_lock(tmp_path):
        pass


def test_runs_write_only_into_folders_forgetless_made(tmp_path, capsys):
    from forgetless.cli import main

    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"mine": true}')
    (foreign / "results.json").write_text("[1, 2, 3]")
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    assert main(["run", str(config_path), "--out", str(foreign)]) == 2
    assert "holds files that forgetless did not write" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before  # nothing written or added
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert main(["run", str(config_path), "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "keep"


def test_a_refused_rerun_leaves_the_run_folder_as_it_was(tmp_path, capsys):
    from forgetless.cli import main

    small = {
        **CONFIG,
        "methods": [CONFIG["methods"][0]],
        "evaluation": {**CONFIG["evaluation"], "general_limit": 1},
    }
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(small))
    out = tmp_path / "run"
    assert main(["run", str(config_path), "--out", str(out), "--no-report"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["run", str(config_path), "train.lr=0.5", "--out", str(out), "--no-report"]) == 2
    assert "train" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _assert_no_half_written_artifacts(out: Path) -> None:
    """Every artifact under its final name is complete: JSON parses, safetensors open."""
    from safetensors import safe_open

    for path in out.rglob("*"):
        if any(part.startswith(".tmp-") for part in path.relative_to(out).parts) or not path.is_file():
            continue  # temp files of an interrupted atomic write: never read
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                list(handle.keys())


def _cli(config_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "forgetless.cli", "run", str(config_path), "--out", str(out), "--no-report"]


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_numbers(tmp_path):
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    reference = tmp_path / "reference"
    subprocess.run(_cli(config_path, reference), check=True, capture_output=True)
    expected = scores(json.loads((reference / "results.json").read_text()))
    rng = random.Random(0)
    for attempt in range(3):
        out = tmp_path / f"killed-{attempt}"
        for _ in range(2):  # kill twice at random points, then let it finish
            proc = subprocess.Popen(
                _cli(config_path, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(rng.uniform(3, 20))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _assert_no_half_written_artifacts(out)
        subprocess.run(_cli(config_path, out), check=True, capture_output=True)
        assert scores(json.loads((out / "results.json").read_text())) == expected


def test_variants_and_validation_runs_reuse_the_trained_stages(tmp_path):
    records = [{"prompt": f"What is the code of item {i}?", "answer": f"K{i % 3}"} for i in range(24)]
    (tmp_path / "codes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    slim = {"r": 2, "alpha": 4, "num_experts": 2, "top_k": 1, "mask_ratio": 0.2}
    data = {
        **CONFIG,
        "data_dir": str(tmp_path),
        "tasks": [
            {"name": "codes", "train": "codes.jsonl", "test": "codes.jsonl", "validation_fraction": 0.25}
        ],
        "methods": [
            {"name": "slim", "strategy": "slim", "params": slim},
            {"name": "slim_same", "variant": {"of": "slim", "adapter": {"mask_ratio": 0.2}}},
            {"name": "slim_p0", "variant": {"of": "slim", "adapter": {"mask_ratio": 0.0, "top_k": 2}}},
        ],
    }
    out = tmp_path / "run"
    results = run_experiment(validate_config(data), out)
    assert list(results["methods"]) == ["slim", "slim_same", "slim_p0"]
    assert results["methods"]["slim_p0"]["kind"] == "variant"
    # a variant with the source's own settings scores exactly what the source scores
    assert scores(results)["slim_same"] == scores(results)["slim"]
    assert (
        list((out / "methods").iterdir())
        and not (out / "methods" / "slim_p0" / "stage-0-codes" / "done.json").exists()
    )
    assert list((out / "methods" / "slim_p0" / "stage-0-codes").glob("eval-*.json"))
    done = out / "methods" / "slim" / "stage-0-codes" / "done.json"
    trained = done.read_text(), done.stat().st_mtime_ns
    validation = run_experiment(
        validate_config({**data, "evaluation": {**data["evaluation"], "split": "validation"}}), out
    )
    assert (done.read_text(), done.stat().st_mtime_ns) == trained  # the stage was reused, not retrained
    assert (out / "validation" / "results.json").exists() and (out / "results.json").exists()
    assert validation["methods"]["slim"]["matrix"][0] is not None
    assert json.loads((out / "results.json").read_text())["run"]["evaluation"]["split"] == "test"


def test_a_changed_inference_default_rescores_the_reused_stage(tmp_path, monkeypatch):
    """After a package default of an inference-only setting changes (SLIM's mask ratio), a rerun
    reuses the trained stage but scores it anew with the new value, not from the old cache."""
    from forgetless.adapters import config as adapter_config

    slim = {"r": 2, "alpha": 4, "num_experts": 2, "top_k": 1}
    data = {
        **CONFIG,
        "tasks": ["kelvar_dates"],
        "methods": [
            {"name": "slim", "strategy": "slim", "params": slim},
            {"name": "slim_p0.7", "variant": {"of": "slim", "adapter": {"mask_ratio": 0.7}}},
        ],
    }
    out = tmp_path / "run"
    first = scores(run_experiment(validate_config(data), out))
    stage = out / "methods" / "slim" / "stage-0-kelvar_dates"
    variant = out / "methods" / "slim_p0.7" / "stage-0-kelvar_dates"
    trained = (stage / "done.json").stat().st_mtime_ns
    assert len(list(stage.glob("eval-*.json"))) == 1
    variant_cache = sorted(variant.glob("eval-*.json"))
    monkeypatch.setitem(
        adapter_config._KIND_DEFAULTS, "slim", {**adapter_config._KIND_DEFAULTS["slim"], "mask_ratio": 0.7}
    )
    second = scores(run_experiment(validate_config(data), out))
    assert (stage / "done.json").stat().st_mtime_ns == trained  # reused, not retrained
    assert len(list(stage.glob("eval-*.json"))) == 2  # scored again under the new default
    assert second["slim"] == first["slim_p0.7"]
    # the variant sets the mask ratio itself: its cached scores still hold and are kept
    assert sorted(variant.glob("eval-*.json")) == variant_cache and second["slim_p0.7"] == first["slim_p0.7"]


def test_an_evaluation_scope_scores_fewer_cells_and_reports_them_as_empty(tmp_path):
    from forgetless.report import write_report

    scope = {"unseen_tasks": False, "general_stages": "last"}
    config = validate_config({**CONFIG, "evaluation": {**CONFIG["evaluation"], **scope}})
    results = run_experiment(config, tmp_path / "run")
    for entry in results["methods"].values():
        matrix, general, items = entry["matrix"], entry["general"], entry["items"]
        assert all(cell is not None for cell in matrix[0] + general[0])  # the base: everything
        assert matrix[1][0] is not None and matrix[1][1] is None  # after stage 1: its task only
        assert general[1] == [None] and general[2][0] is not None  # general: base and last stage
        assert set(items[1]) == {"kelvar_dates"} and set(items[2]) == {
            "kelvar_dates",
            "zorbian_topics",
            "general_commonsense",
        }
        assert entry["metrics"]["retention"] is not None and entry["metrics"]["fwt"] is None
        assert entry["metrics"]["acquisition"] == [matrix[1][0], matrix[2][1]]
    full = run_experiment(validate_config(CONFIG), tmp_path / "full")  # the same stages, every cell
    for name, entry in results["methods"].items():
        for ours, theirs in zip(
            entry["matrix"] + entry["general"],
            full["methods"][name]["matrix"] + full["methods"][name]["general"],
        ):
            assert [a for a in ours if a is not None] == [b for a, b in zip(ours, theirs) if a is not None]
    write_report(results, tmp_path / "run")  # empty cells render, intervals included
    tables = (tmp_path / "run" / "tables.md").read_text()
    assert "seq_lora 1 |" in tables and "[" in tables
    assert "–: not scored after that stage" in tables
