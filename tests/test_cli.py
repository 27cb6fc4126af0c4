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
    assert suites == {"new_knowledge", "general", "paraphrase"}
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


def test_inspect_reports_identity_share_on_builtin_and_config_tasks(tmp_path, capsys):
    import yaml

    from forgetless import load_model
    from forgetless.adapters import AdapterConfig, inject_adapters, save_adapter

    model, _ = load_model("tiny-llama", seed=0)
    inject_adapters(model, AdapterConfig.slim(r=2, num_experts=2, top_k=1))
    adapter = save_adapter(model, tmp_path / "adapter", base_model="tiny-llama")
    assert main(["inspect", str(adapter), "--tasks", "general_commonsense", "--limit", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    share = report["summary"]["general_commonsense"]["identity_share"]
    assert 0.0 <= share <= 1.0 and report["summary"]["general_commonsense"]["tokens"] > 0
    records = [{"prompt": f"Code of item {i}?", "answer": f"K{i}"} for i in range(6)]
    (tmp_path / "codes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"name": "c", "model": "tiny-llama", "tasks": [{"name": "codes", "test": "codes.jsonl"}],
              "methods": [{"name": "slim", "strategy": "slim"}]}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    argv = [
        "inspect",
        str(adapter),
        "--config",
        str(tmp_path / "c.yaml"),
        "--tasks",
        "codes,general_capitals",
    ]
    assert main([*argv, "--limit", "4", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["summary"]) == ["codes", "general_capitals"]
    assert main(["inspect", str(adapter), "--config", str(tmp_path / "c.yaml"), "--tasks", "cods"]) == 2
    assert "unknown task or suite 'cods'" in capsys.readouterr().err


def test_plan_prints_the_detectable_difference_of_the_configured_sizes(tmp_path, capsys):
    import yaml

    config = {
        "name": "p",
        "model": "tiny-llama",
        "tasks": ["kelvar_dates", "zorbian_topics"],
        "limits": {"test": 40},
        "methods": [{"name": "lora", "strategy": "sequential_lora"}],
        "evaluation": {"general": ["general_commonsense"], "general_limit": 20},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["plan", str(path), "--json"]) == 0
    rows = {row["what"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["kelvar_dates"]["items"] == 40 and rows["new tasks, pooled (final average)"]["items"] == 80
    assert rows["general suite, pooled (general score, retention)"]["items"] == 20
    assert rows["new tasks, pooled (final average)"]["detectable"] < rows["kelvar_dates"]["detectable"]
    assert main(["plan", str(path), "limits.test=160", "--json"]) == 0
    larger = {row["what"]: row for row in json.loads(capsys.readouterr().out)}
    assert larger["kelvar_dates"]["detectable"] < rows["kelvar_dates"]["detectable"]
    assert main(["plan", str(path), "--discordance", "2"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--model", "{tmp}/fake.gguf", "--tasks", "kelvar_dates"], "is not a GGUF file"),
        (
            ["eval", "--model", "tiny-llama", "--tasks", "kelvar_dates", "--out", "{tmp}/folder"],
            "is a folder",
        ),
        (["run", "{tmp}/c.yaml", "methods.9.params.r=8"], "must be an index 0..0"),
        (["run", "{tmp}/c.yaml", "seed.x=1"], "is a value (0), not a section"),
    ],
)
def test_ordinary_mistakes_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "fake.gguf").write_text("not a model")
    (tmp_path / "folder").mkdir()
    (tmp_path / "c.yaml").write_text(
        "name: x\nmodel: tiny-llama\nseed: 0\ntasks: [kelvar_dates]\nmethods: [{name: a, strategy: sequential_lora}]\n"
    )
    assert main([part.replace("{tmp}", str(tmp_path)) for part in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert list((tmp_path / "folder").iterdir()) == []


def test_tables_printed_to_a_pipe_are_plain_and_never_cut(capsys):
    assert main(["models"]) == 0  # capsys: stdout is not a terminal
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct\t" in out and "…" not in out and "┃" not in out


def test_the_examples_named_by_merge_and_mix_help_exist_and_validate(capsys):
    import re
    from pathlib import Path

    from forgetless.merging.config import load_merge_config
    from forgetless.mixing.config import load_mix_config

    root = Path(__file__).resolve().parent.parent
    for command, loader in (("merge", load_merge_config), ("mix", load_mix_config)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        (named,) = re.findall(r"examples/\S+\.yaml", out)
        loader(root / named)  # the example validates (its models come from the train command in it)
        assert f"forgetless {command} {named}" in (root / named).read_text()
