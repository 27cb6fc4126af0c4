"""Bad input never costs a file, a wrong number or a traceback.

Each case writes its files into a fresh folder, runs one forgetless command in-process and checks:
exit code 2, exactly one line on stderr naming what is wrong (the expected words), no traceback, no
stage folder or checkpoint anywhere, and a sentinel file in the output folder byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from forgetless.cli import main

GOOD = {
    "name": "bad",
    "model": "tiny-llama",
    "seed": 0,
    "tasks": ["kelvar_dates", "zorbian_topics"],
    "limits": {"train": 4, "test": 2},
    "methods": [{"name": "lora", "strategy": "sequential_lora", "params": {"r": 2}}],
}


def _config(**changes):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return yaml.safe_dump(data)


def _methods(*extra):
    return [GOOD["methods"][0], *extra]


ONE_ROUND = {"name": "one", "strategy": "one_round", "evaluate": False}
RUN = ["run", "{d}/c.yaml", "--out", "{d}/out"]

# (id, files {name: text}, argv, words the one line must hold)
CASES = [
    # --- the experiment YAML
    ("yaml-syntax", {"c.yaml": "name: [unclosed\n"}, RUN, "invalid YAML"),
    ("yaml-not-mapping", {"c.yaml": "- a\n- b\n"}, RUN, "expected a mapping"),
    ("yaml-missing-file", {}, RUN, "does not exist"),
    ("unknown-top-key", {"c.yaml": _config(modle="x")}, RUN, "Did you mean 'model'"),
    ("no-tasks", {"c.yaml": _config(tasks=[])}, RUN, "tasks"),
    ("no-methods", {"c.yaml": _config(methods=[])}, RUN, "methods"),
    ("unknown-task", {"c.yaml": _config(tasks=["kelvar_date"])}, RUN, "kelvar_date"),
    ("duplicate-task", {"c.yaml": _config(tasks=["kelvar_dates", "kelvar_dates"])}, RUN, "appears twice"),
    ("bad-setting", {"c.yaml": _config(setting="cooperative")}, RUN, "setting"),
    ("bad-schedule", {"c.yaml": _config(schedule="parallel")}, RUN, "schedule"),
    ("bad-seed-type", {"c.yaml": _config(seed="zero")}, RUN, "seed"),
    ("negative-limit", {"c.yaml": _config(limits={"train": -1})}, RUN, "limits.train"),
    ("unknown-limit", {"c.yaml": _config(limits={"tests": 3})}, RUN, "Did you mean 'test'"),
    ("train-lr-negative", {"c.yaml": _config(train={"lr": -1})}, RUN, "train.lr"),
    ("train-unknown-key", {"c.yaml": _config(train={"lrr": 1})}, RUN, "Did you mean 'lr'"),
    ("train-epochs-zero", {"c.yaml": _config(train={"epochs": 0})}, RUN, "train.epochs"),
    ("duplicate-method", {"c.yaml": _config(methods=[GOOD["methods"][0]] * 2)}, RUN, "duplicate method name"),
    ("unknown-strategy", {"c.yaml": _config(methods=[{"name": "a", "strategy": "sequential_lroa"}])}, RUN, "Did you mean 'sequential_lora'"),
    ("unknown-param", {"c.yaml": _config(methods=[{"name": "a", "strategy": "sequential_lora", "params": {"rank": 2}}])}, RUN, "rank"),
    ("param-bad-value", {"c.yaml": _config(methods=[{"name": "a", "strategy": "slim", "params": {"top_k": 0}}])}, RUN, "top_k"),
    ("replay-semi", {"c.yaml": _config(methods=[{"name": "a", "strategy": "replay"}])}, RUN, "fully_cooperative"),
    ("method-two-kinds", {"c.yaml": _config(methods=[{"name": "a", "strategy": "slim", "merge": {"method": "ties", "source": "a"}}])}, RUN, "methods.0"),
    ("method-no-kind", {"c.yaml": _config(methods=[{"name": "a"}])}, RUN, "methods.0"),
    ("merge-unknown-source", {"c.yaml": _config(methods=_methods({"name": "m", "merge": {"method": "ties", "source": "nope"}}))}, RUN, "source 'nope'"),
    ("merge-source-not-one-round", {"c.yaml": _config(methods=_methods({"name": "m", "merge": {"method": "ties", "source": "lora"}}))}, RUN, "one_round"),
    ("merge-unknown-method", {"c.yaml": _config(methods=[ONE_ROUND, {"name": "m", "merge": {"method": "tie", "source": "one"}}])}, RUN, "Did you mean 'ties'"),
    ("merge-weights-short", {"c.yaml": _config(methods=[ONE_ROUND, {"name": "m", "merge": {"method": "ties", "source": "one", "weights": [1]}}])}, RUN, "merge.weights"),
    ("merge-param-typo", {"c.yaml": _config(methods=[ONE_ROUND, {"name": "m", "merge": {"method": "ties", "source": "one", "parameters": {"densty": 0.2}}}])}, RUN, "Did you mean 'density'"),
    ("merge-param-range", {"c.yaml": _config(methods=[ONE_ROUND, {"name": "m", "merge": {"method": "ties", "source": "one", "parameters": {"density": 5}}}])}, RUN, "density"),
    ("mix-router-typo", {"c.yaml": _config(methods=[ONE_ROUND, {"name": "m", "mix": {"source": "one", "router": "hiden"}}])}, RUN, "Did you mean 'hidden'"),
    ("mix-top-k", {"c.yaml": _config(methods=[ONE_ROUND, {"name": "m", "mix": {"source": "one", "top_k": 5}}])}, RUN, "top_k"),
    ("mix-param", {"c.yaml": _config(methods=[ONE_ROUND, {"name": "m", "mix": {"source": "one", "parameters": {"bogus": 1}}}])}, RUN, "bogus"),
    ("variant-of-lora", {"c.yaml": _config(methods=_methods({"name": "v", "variant": {"of": "lora", "adapter": {"top_k": 1}}}))}, RUN, "variant"),
    ("variant-training-field", {"c.yaml": _config(methods=[{"name": "s", "strategy": "slim"}, {"name": "v", "variant": {"of": "s", "adapter": {"r": 4}}}])}, RUN, "not an inference-time setting"),
    ("report-reference", {"c.yaml": _config(report={"reference": "slm"})}, RUN, "report.reference"),
    ("general-unknown", {"c.yaml": _config(evaluation={"general": ["general_capital"]})}, RUN, "general_capital"),
    ("eval-split", {"c.yaml": _config(evaluation={"split": "dev"})}, RUN, "split"),
    ("data-dir-missing", {"c.yaml": _config(data_dir="nowhere")}, RUN, "data_dir"),
    # --- data files
    ("data-file-missing", {"c.yaml": _config(tasks=[{"name": "t", "train": "train.jsonl", "test": "test.jsonl"}])}, RUN, "train.jsonl"),
    ("data-file-bad-json", {"c.yaml": _config(tasks=[{"name": "t", "train": "t.jsonl", "test": "t.jsonl"}]), "t.jsonl": "{not json\n"}, RUN, "t.jsonl"),
    ("data-file-no-fields", {"c.yaml": _config(tasks=[{"name": "t", "train": "t.jsonl", "test": "t.jsonl"}]), "t.jsonl": '{"x": 1}\n'}, RUN, "t.jsonl"),
    ("data-spec-unknown-key", {"c.yaml": _config(tasks=[{"name": "t", "trian": "t.jsonl"}])}, RUN, "trian"),
    # --- overrides
    ("override-no-equals", {"c.yaml": _config()}, ["run", "{d}/c.yaml", "lr", "--out", "{d}/out"], "not key=value"),
    ("override-index", {"c.yaml": _config()}, ["run", "{d}/c.yaml", "methods.9.params.r=8", "--out", "{d}/out"], "index 0..0"),
    ("override-under-value", {"c.yaml": _config()}, ["run", "{d}/c.yaml", "seed.x=1", "--out", "{d}/out"], "not a section"),
    ("override-name-index", {"c.yaml": _config()}, ["run", "{d}/c.yaml", "methods.x.name=foo", "--out", "{d}/out"], "must be an index"),
    ("override-bad-yaml", {"c.yaml": _config()}, ["run", "{d}/c.yaml", "name=[x", "--out", "{d}/out"], "not valid YAML"),
    ("override-bad-value", {"c.yaml": _config()}, ["run", "{d}/c.yaml", "train.lr=-3", "--out", "{d}/out"], "train.lr"),
    # --- output folders
    ("out-is-a-file", {"c.yaml": _config(), "f": "x"}, ["run", "{d}/c.yaml", "--out", "{d}/f"], "is a file"),
    ("out-foreign-folder", {"c.yaml": _config(), "out/notes.txt": "mine"}, RUN, "did not write"),
    # --- models, adapters, evaluation
    ("eval-unknown-model", {}, ["eval", "--model", "tiny-lama", "--tasks", "kelvar_dates"], "tiny-lama"),
    ("eval-fake-gguf", {"m.gguf": "not gguf"}, ["eval", "--model", "{d}/m.gguf", "--tasks", "kelvar_dates"], "not a GGUF file"),
    ("eval-missing-gguf", {}, ["eval", "--model", "{d}/none.gguf", "--tasks", "kelvar_dates"], "does not exist"),
    ("eval-unknown-task", {}, ["eval", "--model", "tiny-llama", "--tasks", "kelvar"], "kelvar"),
    ("eval-spec-unknown-key", {"t.yaml": "name: t\ntest: t.jsonl\nmetrik: accuracy\n"},
     ["eval", "--model", "tiny-llama", "--tasks", "{d}/t.yaml"], "Did you mean 'metric'"),
    ("eval-spec-yaml-syntax", {"t.yaml": "name: t\n  bad: [\n"},
     ["eval", "--model", "tiny-llama", "--tasks", "{d}/t.yaml"], "line 2: invalid YAML"),
    ("serve-stage-and-adapter", {"stage/done.json": "{}"},
     ["serve", "{d}/stage", "--adapter", "{d}/stage"], "brings its own adapter"),
    ("eval-out-folder", {"out/x": "1"}, ["eval", "--model", "tiny-llama", "--tasks", "kelvar_dates", "--out", "{d}/out"], "is a folder"),
    ("eval-adapter-not-folder", {}, ["eval", "--model", "tiny-llama", "--tasks", "kelvar_dates", "--adapter", "{d}/nothing"], "not an adapter folder"),
    ("eval-adapter-bad-json", {"ad/forgetless_adapter.json": "{oops"}, ["eval", "--model", "tiny-llama", "--tasks", "kelvar_dates", "--adapter", "{d}/ad"], "not valid JSON"),
    ("eval-peft-not-lora", {"ad/adapter_config.json": '{"peft_type": "IA3"}'}, ["eval", "--model", "tiny-llama", "--tasks", "kelvar_dates", "--adapter", "{d}/ad"], "LORA"),
    ("ask-unknown-model", {}, ["ask", "hi", "--model", "smollm3"], "smollm3"),
    ("inspect-not-adapter", {}, ["inspect", "{d}/nothing"], "not a forgetless adapter folder"),
    ("report-no-results", {"out/x": "1"}, ["report", "{d}/out"], "results.json"),
    ("report-bad-results", {"out/results.json": '{"tasks": 3}'}, ["report", "{d}/out"], "results.json"),
    ("plan-discordance", {"c.yaml": _config()}, ["plan", "{d}/c.yaml", "--discordance", "2"], "discordance"),
    ("plan-bad-config", {"c.yaml": _config(modle="x")}, ["plan", "{d}/c.yaml"], "Did you mean 'model'"),
    # --- merge and mix YAML
    ("merge-yaml-missing", {}, ["merge", "{d}/m.yaml", "--out", "{d}/out"], "does not exist"),
    ("merge-yaml-method", {"m.yaml": "merge_method: tie\nmodels: [{model: a}]\n"}, ["merge", "{d}/m.yaml", "--out", "{d}/out"], "tie"),
    ("merge-yaml-unknown-key", {"m.yaml": "merge_method: ties\nmodles: []\n"}, ["merge", "{d}/m.yaml", "--out", "{d}/out"], "modles"),
    ("mix-yaml-missing", {}, ["mix", "{d}/x.yaml", "--out", "{d}/out"], "does not exist"),
    ("mix-yaml-router", {"x.yaml": "base_model: tiny-llama\nexperts: [{model: a}]\nrouter: hiden\n"}, ["mix", "{d}/x.yaml", "--out", "{d}/out"], "hiden"),
    # --- train
    ("train-unknown-strategy", {}, ["train", "--strategy", "slm", "--tasks", "kelvar_dates", "--out", "{d}/out"], "slm"),
    ("train-unknown-task", {}, ["train", "--strategy", "slim", "--tasks", "kelvr", "--out", "{d}/out"], "kelvr"),
    ("train-bad-param", {}, ["train", "--strategy", "slim", "--tasks", "kelvar_dates", "--param", "rr=2", "--out", "{d}/out"], "rr"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "argv", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_costs_nothing(tmp_path, capsys, files, argv, words):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    sentinel = tmp_path / "out" / "sentinel.bin"
    if (tmp_path / "out").is_dir():
        sentinel.write_bytes(b"\x00keep me\xff")
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    code = main([part.replace("{d}", str(tmp_path)) for part in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err
    after = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    new = after - before
    assert not [p for p in new if p.name.startswith("stage-") or p.name == "checkpoint"], new
    if sentinel.exists():
        assert sentinel.read_bytes() == b"\x00keep me\xff"
    assert not (Path(tmp_path) / "out" / "config.json").exists() or "out/config.json" in files


def test_the_suite_is_large_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_a_misspelt_required_key_is_named_as_the_typo(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(_config(tasks=None, taks=["kelvar_dates"]))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key 'taks'. Did you mean 'tasks'" in capsys.readouterr().err
