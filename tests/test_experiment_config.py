from pathlib import Path

import pytest
import yaml

from forgetless.config import apply_overrides, load_config, validate_config
from forgetless.errors import InputError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))

MINIMAL = {
    "name": "t",
    "model": "tiny-llama",
    "tasks": ["kelvar_dates", "zorbian_topics"],
    "methods": [{"name": "lora", "strategy": "sequential_lora"}],
}


def config_with(**changes):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data.update(changes)
    return data


def test_minimal_config_validates():
    config = validate_config(config_with())
    assert config.task_names() == ["kelvar_dates", "zorbian_topics"]
    assert config.setting == "semi_cooperative"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(InputError, match=r"unknown key 'methods.0.stratgy'. Did you mean 'strategy'\?"):
        validate_config(config_with(methods=[{"name": "a", "stratgy": "sequential_lora"}]))
    with pytest.raises(InputError, match=r"unknown key 'limits.trian'. Did you mean 'train'\?"):
        validate_config(config_with(limits={"trian": 3}))


def test_unknown_task_and_suite_names():
    with pytest.raises(InputError, match="unknown task or suite 'kelvar_date'. Did you mean 'kelvar_dates'"):
        validate_config(config_with(tasks=["kelvar_date"]))
    with pytest.raises(InputError, match="unknown task or suite 'genral'"):
        validate_config(config_with(evaluation={"general": ["genral"]}))


def test_method_needs_exactly_one_kind_and_unique_names():
    with pytest.raises(InputError, match="needs exactly one of strategy, merge, mix or variant"):
        validate_config(config_with(methods=[{"name": "a"}]))
    with pytest.raises(InputError, match="duplicate method name 'a'"):
        validate_config(config_with(methods=[{"name": "a", "strategy": "one_round"}] * 2))


def test_merge_source_must_be_a_one_round_method():
    methods = [
        {"name": "lora", "strategy": "sequential_lora"},
        {"name": "m", "merge": {"method": "ties", "source": "lora"}},
    ]
    with pytest.raises(InputError, match="must use strategy one_round"):
        validate_config(config_with(methods=methods))
    methods[1]["merge"]["source"] = "lroa"
    with pytest.raises(InputError, match="source 'lroa' is not a method of this config. Did you mean 'lora'"):
        validate_config(config_with(methods=methods))
    methods = [
        {"name": "one", "strategy": "one_round"},
        {"name": "m", "merge": {"method": "tiez", "source": "one"}},
    ]
    with pytest.raises(InputError, match="unknown merge method 'tiez'. Did you mean 'ties'"):
        validate_config(config_with(methods=methods))


def test_missing_data_file_is_named(tmp_path):
    data = config_with(tasks=[{"name": "mine", "test": "nope.jsonl"}])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    from forgetless.experiment.runner import load_tasks

    with pytest.raises(InputError, match=r"nope.jsonl does not exist"):
        load_tasks(config)


def test_overrides_and_yaml_errors(tmp_path):
    data = apply_overrides(config_with(), ["train.lr=1e-4", "methods.0.params.r=8", "seed=3"])
    assert data["train"]["lr"] == 1e-4 and data["methods"][0]["params"]["r"] == 8 and data["seed"] == 3
    with pytest.raises(InputError, match="is not key=value"):
        apply_overrides({}, ["oops"])
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(path)
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_validates(path, tmp_path):
    overrides = [f"data_dir={tmp_path}"] if "data_dir:" in path.read_text() else []
    config = load_config(path, overrides)
    assert config.methods


def test_demo_example_is_the_packaged_demo():
    from importlib.resources import files

    packaged = files("forgetless.experiment").joinpath("demo.yaml").read_text(encoding="utf-8")
    assert (Path(__file__).parent.parent / "examples" / "demo.yaml").read_text(encoding="utf-8") == packaged


def test_report_reference_names_an_evaluated_method():
    methods = [{"name": "lora", "strategy": "sequential_lora"}, {"name": "slim", "strategy": "slim"}]
    assert (
        validate_config(config_with(methods=methods, report={"reference": "slim"})).report.reference == "slim"
    )
    with pytest.raises(
        InputError, match=r"report.reference: 'slm' is not an evaluated method.*Did you mean 'slim'"
    ):
        validate_config(config_with(methods=methods, report={"reference": "slm"}))


def test_report_reference_picks_the_compared_method():
    from forgetless.evaluation.uncertainty import default_reference

    methods = {"a": {"kind": "slim"}, "b": {"kind": "sequential_lora"}, "c": {"kind": "sequential_lora"}}
    assert default_reference({"methods": methods}) == "b"
    assert default_reference({"methods": methods, "run": {"report": {"reference": "c"}}}) == "c"
    assert default_reference({"methods": {"a": {"kind": "slim"}}}) == "a"
    # as a run writes it: kind "strategy", the strategy in the run's config
    run = {"methods": [{"name": "s", "strategy": "slim"}, {"name": "l", "strategy": "sequential_lora"}]}
    written = {"s": {"kind": "strategy"}, "l": {"kind": "strategy"}}
    assert default_reference({"methods": written, "run": run}) == "l"


def test_replay_in_semi_cooperative_setting_is_an_error():
    with pytest.raises(InputError, match="strategy 'replay' needs setting fully_cooperative"):
        validate_config(config_with(methods=[{"name": "r", "strategy": "replay"}]))
    config = validate_config(
        config_with(setting="fully_cooperative", methods=[{"name": "r", "strategy": "replay"}])
    )
    assert config.methods[0].strategy == "replay"


def test_strategy_params_and_train_settings_checked_before_compute():
    with pytest.raises(InputError, match=r"methods.0 \('lora'\).*unknown"):
        validate_config(
            config_with(methods=[{"name": "lora", "strategy": "sequential_lora", "params": {"rank": 8}}])
        )
    with pytest.raises(InputError, match=r"^config: unknown key 'train.lrr'. Did you mean 'lr'"):
        validate_config(config_with(train={"lrr": 1e-3}))
    with pytest.raises(
        InputError, match="unknown strategy 'sequential_lroa'. Did you mean 'sequential_lora'"
    ):
        validate_config(config_with(methods=[{"name": "x", "strategy": "sequential_lroa"}]))


def test_variant_needs_a_routed_strategy_and_inference_settings_only():
    slim = {"name": "slim", "strategy": "slim", "params": {"r": 2}}

    def variant(**spec):
        return {"name": "v", "variant": {"of": "slim", "adapter": {"mask_ratio": 0.5}, **spec}}

    config = validate_config(config_with(methods=[slim, variant()]))
    assert config.methods[1].kind == "variant"
    with pytest.raises(InputError, match="variant.of: 'slm' is not a strategy method.*Did you mean 'slim'"):
        validate_config(config_with(methods=[slim, variant(of="slm")]))
    with pytest.raises(
        InputError, match="'mask_ratoi' is not an inference-time setting. Did you mean 'mask_ratio'"
    ):
        validate_config(config_with(methods=[slim, variant(adapter={"mask_ratoi": 0.5})]))
    with pytest.raises(InputError, match="'r' is not an inference-time setting"):
        validate_config(config_with(methods=[slim, variant(adapter={"r": 4})]))
    lora = {"name": "slim", "strategy": "sequential_lora"}
    with pytest.raises(InputError, match="trains no routed adapter such as moe_lora or slim"):
        validate_config(config_with(methods=[lora, variant()]))
    with pytest.raises(InputError, match="mask_ratio: Input should be less than 1"):
        validate_config(config_with(methods=[slim, variant(adapter={"mask_ratio": 1.5})]))
    no_yielding = {
        "name": "slim",
        "strategy": "slim",
        "params": {"yield_scale": 0.0, "yield_pooling": "token"},
    }
    with pytest.raises(InputError, match="yield_scale > 0 needs sliding clustering"):
        validate_config(config_with(methods=[no_yielding, variant(adapter={"yield_scale": 1.0})]))


def test_general_tasks_may_be_data_files_and_names_are_unique(tmp_path):
    items = tmp_path / "mc.jsonl"
    items.write_text('{"query": "Question: 1 + 1?", "choices": ["2", "3"], "gold": 0}\n')
    spec = {"name": "mc", "test": str(items), "fields": {"prompt": "query", "choices": "choices", "gold": "gold"},
            "metric": "loglik_mc"}  # fmt: skip
    config = validate_config(config_with(evaluation={"general": ["general_commonsense", spec]}))
    from forgetless.experiment.runner import load_tasks

    _, general = load_tasks(config)
    assert [task.name for task in general] == ["general_commonsense", "mc"]
    assert general[1].kind == "general" and general[1].test[0].choices == ("2", "3")
    with pytest.raises(InputError, match="task 'kelvar_dates' appears twice"):
        validate_config(config_with(evaluation={"general": [{**spec, "name": "kelvar_dates"}]}))


def test_validation_split_needs_a_validation_set(tmp_path):
    from forgetless.experiment.runner import Runner, results_folder

    config = validate_config(config_with(evaluation={"split": "validation"}))
    with pytest.raises(InputError, match="task 'kelvar_dates' has no validation split; give it validation"):
        Runner(config, tmp_path)
    assert results_folder(config, tmp_path) == tmp_path / "validation"


def test_validation_runs_score_their_own_general_probes():
    from forgetless.experiment.runner import load_tasks

    data = config_with(
        evaluation={"general": ["general_arithmetic"], "validation_general": ["general_capitals"]}
    )
    _, general = load_tasks(validate_config(data))
    assert [task.name for task in general] == ["general_arithmetic"]
    data["evaluation"]["split"] = "validation"
    _, general = load_tasks(validate_config(data))
    assert [task.name for task in general] == ["general_capitals"]
    with pytest.raises(InputError, match="evaluation.validation_general: unknown task or suite 'capitals'"):
        validate_config(config_with(evaluation={"validation_general": ["capitals"]}))


def test_data_dir_override_is_relative_to_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    path = tmp_path / "configs" / "c.yaml"
    path.write_text(yaml.safe_dump(config_with(data_dir="../data")))
    assert load_config(path).data_root().resolve() == tmp_path / "data"  # in the YAML: from the file
    monkeypatch.chdir(tmp_path)
    assert load_config(path, ["data_dir=data"]).data_root().resolve() == tmp_path / "data"  # typed: from here
    with pytest.raises(InputError, match=r"data_dir: folder \S*configs/data does not exist"):
        load_config(path, ["data_dir=configs/data"])


ONE_ROUND = {"name": "one", "strategy": "one_round", "evaluate": False}


@pytest.mark.parametrize(
    ("combine", "message"),
    [
        ({"merge": {"method": "ties", "source": "one", "weights": [1.0]}}, "merge.weights has 1 weight"),
        (
            {"merge": {"method": "ties", "source": "one", "parameters": {"densty": 0.2}}},
            "Did you mean 'density'",
        ),
        (
            {"merge": {"method": "ties", "source": "one", "parameters": {"density": 5}}},
            r"density must be in \(0, 1\]",
        ),
        (
            {"merge": {"method": "dare", "source": "one", "parameters": {"rescale": "yes"}}},
            "merge: parameters",
        ),
        ({"mix": {"source": "one", "router": "hiden"}}, "Did you mean 'hidden'"),
        ({"mix": {"source": "one", "top_k": 3}}, "mix.top_k 3 is more than the 2 expert"),
        ({"mix": {"source": "one", "parameters": {"prompts_per_expert": -1}}}, "prompts_per_expert"),
        ({"mix": {"source": "one", "parameters": {"bogus": 1}}}, "unknown parameter 'bogus'"),
        ({"mix": {"source": "one", "parameters": {"router": "uniform"}}}, "'router' is set by the run"),
    ],
)
def test_merge_and_mix_settings_are_checked_before_any_training(combine, message):
    """A merge or mix runs after all training; its mistakes must stop the run before it starts."""
    with pytest.raises(InputError, match=message) as error:
        validate_config(config_with(methods=[ONE_ROUND, {"name": "m", **combine}]))
    assert "methods.1 ('m')" in str(error.value) and "\n" not in str(error.value)
    # the same settings with every value right pass
    fixed = {"merge": {"method": "ties", "source": "one", "parameters": {"density": 0.2}, "weights": [1, 2]}}
    validate_config(config_with(methods=[ONE_ROUND, {"name": "m", **fixed}]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("methods.9.params.r=8", r"methods is a list of 1; '9' must be an index 0..0"),
        ("methods.x.name=foo", r"methods is a list of 1; 'x' must be an index"),
        ("seed.x=1", r"seed is a value \(0\), not a section"),
        ("train..lr=1", "has an empty part"),
        ("name=[unclosed", "the value is not valid YAML"),
        ("just_a_word", "is not key=value"),
    ],
)
def test_bad_overrides_are_one_clear_error(override, message):
    data = config_with(seed=0)
    with pytest.raises(InputError, match=message) as error:
        apply_overrides(data, [override])
    assert "\n" not in str(error.value) and override in str(error.value)


def test_the_valid_keys_listed_are_keys_a_user_writes():
    with pytest.raises(InputError, match="unknown key 'modle'") as error:
        validate_config(config_with(modle="x"))
    assert "base_dir" not in str(error.value) and "methods" in str(error.value)


def test_a_run_level_train_mistake_is_blamed_on_the_run():
    with pytest.raises(InputError, match=r"^config: train.lr: Input should be greater than 0$"):
        validate_config(config_with(train={"lr": -1}))
    methods = [{"name": "lora", "strategy": "sequential_lora", "train": {"epochs": 0}}]
    with pytest.raises(InputError, match=r"^config: methods.0 \('lora'\): train.epochs"):
        validate_config(config_with(methods=methods))
