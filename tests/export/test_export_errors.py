"""Bad export input: one InputError naming the option and the fix, before anything is written."""

from __future__ import annotations

import pytest
from export_helpers import randomize

from forgetless import load_model
from forgetless.adapters import AdapterConfig, inject_adapters, save_adapter
from forgetless.cli import main
from forgetless.errors import InputError
from forgetless.export import export_model


@pytest.fixture()
def slim_adapter(tmp_path):
    model, tokenizer = load_model("tiny-llama", seed=0)
    inject_adapters(model, AdapterConfig.slim(r=2, num_experts=2), tokenizer=tokenizer)
    randomize(model, seed=2)
    return save_adapter(model, tmp_path / "slim", base_model="tiny-llama")


def test_an_existing_output_folder_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        export_model("tiny-llama", tmp_path / "out")


def test_an_unknown_engine_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(InputError, match="--for: unknown export target 'vlm'. Did you mean 'vllm'"):
        export_model("tiny-llama", tmp_path / "out", target="vlm")
    assert main(["export", "tiny-llama", "--for", "tgi-server", "--out", str(tmp_path / "out")]) == 2
    assert "Valid names: vllm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_mixture_without_known_tasks_asks_for_calibration(tmp_path, slim_adapter):
    with pytest.raises(InputError, match="--calibration: the slim adapter's expert mixture"):
        export_model("tiny-llama", tmp_path / "out", adapter=slim_adapter)
    assert not (tmp_path / "out").exists()


def test_unknown_calibration_tasks_fail_before_loading(tmp_path, slim_adapter):
    with pytest.raises(InputError, match="unknown task or suite 'kelvar_date'. Did you mean 'kelvar_dates'"):
        export_model("tiny-llama", tmp_path / "out", adapter=slim_adapter, calibration=["kelvar_date"])
    with pytest.raises(InputError, match="--calibration-limit 0"):
        export_model(
            "tiny-llama",
            tmp_path / "out",
            adapter=slim_adapter,
            calibration=["kelvar_dates"],
            calibration_limit=0,
        )


def test_a_stage_folder_of_tasks_that_are_not_built_in_asks_for_calibration(tmp_path):
    from forgetless.data import Example, Task
    from forgetless.training import run_strategy

    examples = [Example(prompt=f"code of item {i}?", answer=f"K{i}") for i in range(4)]
    task = Task(name="codes", train=examples, test=examples[:2])
    train = {"max_steps": 1, "batch_size": 4, "progress": False}
    stage = run_strategy("slim", {"r": 2, "num_experts": 2}, "tiny-llama", [task], train, tmp_path / "run")[0]
    with pytest.raises(
        InputError, match="stage's calibration tasks cannot be built .*pass --calibration TASKS"
    ):
        export_model(str(stage.folder), tmp_path / "out")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT calls an API transformers 5 deprecates
def test_a_model_with_peft_layers_is_refused():
    from peft import LoraConfig, get_peft_model

    from forgetless.export.layout import describe

    model, _ = load_model("tiny-llama", seed=0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(InputError, match="is a PEFT layer .*plain LoRA only"):
        describe(peft_model.get_base_model())
