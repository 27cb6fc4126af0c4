import json
import subprocess
import sys

import pytest

from forgetless.cli import main


def test_models_json_lists_aliases(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"smollm2-135m-instruct", "tiny-llama"} <= {row["name"] for row in rows}


def test_tasks_json_lists_suites(capsys):
    assert main(["tasks", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    suites = {row["suite"] for row in rows}
    assert suites == {"new_knowledge", "general"}
    assert all(row["test"] > 0 for row in rows)


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nmodle: tiny-llama\ntasks: [kelvar_dates]\nmethods: [{name: a, strategy: one_round}]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "forgetless.cli", "run", str(bad), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "unknown key 'modle'" in lines[0] and "Did you mean 'model'?" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written before validation passed


def test_ask_unknown_model_exits_2(capsys):
    assert main(["ask", "hi", "--model", "tiny-lama"]) == 2
    assert "Did you mean 'tiny-llama'" in capsys.readouterr().err


@pytest.mark.real_model
def test_ask_default_model_says_paris(capsys, default_model):
    assert main(["ask", "What is the capital of France?", "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out
