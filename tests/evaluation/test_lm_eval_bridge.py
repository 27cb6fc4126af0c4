"""The lm-eval bridge, offline: a custom task YAML over a local JSONL file, scored by lm-eval with
the ``forgetless`` model type, agrees with our own evaluation item by item."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
bridge = pytest.importorskip("forgetless.evaluation.lm_eval_bridge")

from forgetless import load_model  # noqa: E402
from forgetless.data.task import Example, Task  # noqa: E402
from forgetless.errors import InputError  # noqa: E402
from forgetless.evaluation import evaluate_task  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


@pytest.fixture()
def local_task(tmp_path):
    """Eight synthetic 3-way questions in a JSONL file and an lm-eval task YAML over it."""
    items = [
        {"query": f"Question: which colour comes {i + 1}th in my list?", "choices": COLOURS[i : i + 3] or ["x"],
         "gold": i % 3}
        for i in range(6)
    ]  # fmt: skip
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    (tmp_path / "fl_local_mc.yaml").write_text(
        "task: fl_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    task = Task(
        "fl_local_mc", [],
        [Example(f"{it['query']}\nAnswer:", it["choices"][it["gold"]], tuple(it["choices"]), it["gold"]) for it in items],
        metric="loglik_mc",
    )  # fmt: skip
    return tmp_path, task


def _lm_eval(folder, model_args):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return lm_eval.simple_evaluate(model="forgetless", model_args=model_args, tasks=["fl_local_mc"],
                                   task_manager=manager, batch_size=4, log_samples=True)  # fmt: skip


def _check_agreement(out, ours):
    samples = sorted(out["samples"]["fl_local_mc"], key=lambda s: s["doc_id"])
    theirs = [[resp[0] for resp in sample["filtered_resps"]] for sample in samples]
    for their_lls, detail in zip(theirs, ours.details):
        assert detail["loglikelihoods"] == pytest.approx(their_lls, abs=1e-3)
    scores = bridge.scores_from_lm_eval(out)
    assert scores["fl_local_mc"] == pytest.approx(ours.measures["acc"])
    assert bridge.scores_from_lm_eval(out, measure="acc_norm")["fl_local_mc"] == pytest.approx(
        ours.measures["acc_norm"]
    )


def test_forgetless_model_type_agrees_with_evaluate_task(local_task):
    folder, task = local_task
    out = _lm_eval(folder, "pretrained=tiny-llama")
    model, tokenizer = load_model("tiny-llama")
    ours = evaluate_task(model, tokenizer, task, style="plain")
    _check_agreement(out, ours)
    assert out["config"]["forgetless"]["pretrained"] == "tiny-llama"


def test_forgetless_model_type_loads_an_adapter(local_task, tmp_path):
    adapters = pytest.importorskip("forgetless.adapters")
    folder, task = local_task
    model, tokenizer = load_model("tiny-llama")
    adapters.inject_adapters(model, adapters.AdapterConfig(kind="lora", r=2, seed=0))
    with torch.no_grad():
        for parameter in adapters.trainable_parameters(model):
            parameter.normal_(0, 0.5)
    saved = adapters.save_adapter(model, tmp_path / "adapter", base_model="tiny-llama")
    out = _lm_eval(folder, f"pretrained=tiny-llama,adapter={saved}")
    ours = evaluate_task(model, tokenizer, task, style="plain")
    _check_agreement(out, ours)
    base_model, _ = load_model("tiny-llama")
    base = evaluate_task(base_model, tokenizer, task, style="plain")
    assert base.details[0]["loglikelihoods"] != pytest.approx(ours.details[0]["loglikelihoods"], abs=1e-3)


@pytest.mark.slow  # a fresh process that imports lm-eval and indexes its task folder
@pytest.mark.parametrize("entry", ["module", "forgetless lm-eval"])
def test_command_line(local_task, tmp_path, entry):
    """As documented: ``forgetless lm-eval --model forgetless ...`` (README), and the module."""
    folder, _ = local_task
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    launcher = (
        [sys.executable, "-m", "forgetless.evaluation.lm_eval_bridge"]
        if entry == "module"
        else [str(Path(sys.executable).parent / "forgetless"), "lm-eval"]
    )
    command = [*launcher, "--model", "forgetless",
               "--model_args", "pretrained=tiny-llama", "--tasks", "fl_local_mc", "--include_path", str(folder),
               "--output_path", str(tmp_path / "out"), "--batch_size", "4"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    scores = bridge.scores_from_lm_eval(json.loads(written[0].read_text()))
    assert set(scores) == {"fl_local_mc"} and 0.0 <= scores["fl_local_mc"] <= 1.0


def test_scores_from_lm_eval_mapping():
    out = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                    "acc_norm,none": 0.6}, "gsm8k": {"exact_match,strict-match": 0.25}}}  # fmt: skip
    assert bridge.scores_from_lm_eval(out, rename={"arc_easy": "arc_e"}) == {"arc_e": 0.5, "gsm8k": 0.25}
    with pytest.raises(InputError, match="reports acc, acc_norm"):
        bridge.scores_from_lm_eval({"results": {"arc_easy": out["results"]["arc_easy"]}}, measure="f1")
    with pytest.raises(InputError, match="'results' section"):
        bridge.scores_from_lm_eval({})
