"""Bad merge configs and mismatched inputs fail with one clear line, before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from forgetless.errors import InputError
from forgetless.merging import load_merge_config, run_merge, validate_merge_config


def base_config(**changes):
    data = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m1"}, {"model": "m2"}]}
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (base_config(merge_methd="ties"), r"unknown key 'merge_methd'. Did you mean 'merge_method'\?"),
        (base_config(merge_method="tise"), r"unknown merge method 'tise'. Did you mean 'ties'\?"),
        (base_config(parameters={"densty": 0.2}), r"unknown parameter 'densty' .* Did you mean 'density'\?"),
        (
            base_config(models=[{"model": "m1", "parameters": {"lambda": 2.0}}]),
            r"models.0.parameters: 'lambda' is shared by all models; put it under the top-level parameters",
        ),
        (base_config(parameters={"density": 1.5}), r"density must be in \(0, 1\]"),
        (base_config(parameters={"normalize": "yes"}), r"parameter 'normalize' must be bool"),
        (
            base_config(base_model=None),
            r"base_model: merge method ties measures task vectors from a base model",
        ),
        (base_config(output="lora"), r"out_rank: output lora re-factorises"),
        (base_config(out_rank=8), r"out_rank only applies to output: lora"),
        (base_config(merge_method="dare", parameters={"rescale": "l3"}), r"parameters: unknown rescale 'l3'"),
        (
            {
                "merge_method": "average",
                "models": [
                    {"model": "a", "parameters": {"weight": 1}},
                    {"model": "c", "parameters": {"weight": -1}},
                ],
            },
            r"weights sum to zero",
        ),
        (base_config(models=[{"model": "b"}]), r"every entry is the base model"),
        (base_config(modls=[]), r"unknown key 'modls'. Did you mean 'models'\?"),
        (
            base_config(models=[{"model": "m1", "weight": 1}]),
            r"unknown key 'models.0.weight': method parameters go under models.0.parameters",
        ),
    ],
)
def test_config_errors_name_the_field_and_the_fix(data, message):
    with pytest.raises(InputError, match=message):
        validate_merge_config(data, "merge.yaml")


def test_load_merge_config_resolves_relative_paths_and_reports_yaml_lines(tmp_path, llama_folders):
    base, variants = llama_folders
    shutil.copytree(variants[0], tmp_path / "ft")
    (tmp_path / "merge.yaml").write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: ft\n    parameters: {{weight: 0.5}}\n"
    )
    config = load_merge_config(tmp_path / "merge.yaml")
    assert config.resolve("ft") == str((tmp_path / "ft").resolve())
    summary = run_merge(config, tmp_path / "out")
    assert summary["num_models"] == 1
    (tmp_path / "bad.yaml").write_text("merge_method: ties\nmodels: [\n")
    with pytest.raises(InputError, match=r"bad.yaml line \d+: invalid YAML"):
        load_merge_config(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="does not exist"):
        load_merge_config(tmp_path / "missing.yaml")


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-out*"))


def test_architecture_mismatch(llama_folders, tmp_path):
    from forgetless import load_model

    base, variants = llama_folders
    qwen, tokenizer = load_model("tiny-qwen2")
    qwen.save_pretrained(tmp_path / "qwen")
    config = validate_merge_config(
        base_config(
            base_model=str(base), models=[{"model": str(variants[0])}, {"model": str(tmp_path / "qwen")}]
        )
    )
    with pytest.raises(
        InputError, match=r"qwen: architecture qwen2 \(Qwen2ForCausalLM\) differs from .*llama"
    ):
        run_merge(config, tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_shape_and_missing_tensor_mismatch(llama_folders, tmp_path):
    base, variants = llama_folders
    for name, edit, message in [
        (
            "missing",
            lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
            r"lacks tensor model.layers.1.mlp.up_proj.weight",
        ),
        (
            "shape",
            lambda s: s.__setitem__("model.norm.weight", torch.ones(33)),
            r"tensor model.norm.weight has shape \[33\]",
        ),
    ]:
        folder = tmp_path / name
        shutil.copytree(variants[1], folder)
        state = load_file(folder / "model.safetensors")
        edit(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        config = validate_merge_config(
            base_config(base_model=str(base), models=[{"model": str(variants[0])}, {"model": str(folder)}])
        )
        with pytest.raises(InputError, match=message):
            run_merge(config, tmp_path / "out")
        assert_nothing_written(tmp_path)


def test_tokenizer_mismatch(llama_folders, tmp_path):
    base, variants = llama_folders
    folder = tmp_path / "other_tokenizer"
    shutil.copytree(variants[1], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two token ids swapped
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = validate_merge_config(
        base_config(base_model=str(base), models=[{"model": str(variants[0])}, {"model": str(folder)}])
    )
    with pytest.raises(InputError, match=r"other_tokenizer: its tokenizer's vocabulary differs"):
        run_merge(config, tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_lora_errors(llama_folders, lora_folders, tmp_path):
    from forgetless.models.tiny import build_tiny_model

    base, variants = llama_folders
    wide = build_tiny_model("llama", vocab_size=49152, bos=1, eos=2, pad=2)
    wide.config.hidden_size = 32  # same config, but save a model with different q_proj rows below
    state = wide.state_dict()
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(48, 32)
    (tmp_path / "wide").mkdir()
    wide.config.save_pretrained(tmp_path / "wide")
    save_file(
        {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
        tmp_path / "wide" / "model.safetensors",
    )
    cases = [
        (
            dict(base_model=str(tmp_path / "wide")),
            r"module model.layers.0.self_attn.q_proj delta shape \[32, 32\] != base",
        ),
        (
            dict(base_model=str(base), models=[{"model": str(lora_folders[0])}, {"model": str(variants[0])}]),
            "mixes full models and LoRA",
        ),
        (dict(base_model=str(lora_folders[1])), "is a LoRA adapter; give the full model"),
    ]
    for changes, message in cases:
        data = base_config(models=[{"model": str(lora_folders[0])}, {"model": str(lora_folders[1])}])
        data.update(changes)
        with pytest.raises(InputError, match=message):
            run_merge(validate_merge_config(data), tmp_path / "out")
        assert_nothing_written(tmp_path)
    full = validate_merge_config(
        base_config(
            base_model=str(base), models=[{"model": str(v)} for v in variants], output="lora", out_rank=4
        )
    )
    with pytest.raises(InputError, match="output: lora needs LoRA adapter inputs"):
        run_merge(full, tmp_path / "out")


def test_existing_output_is_kept_and_a_crash_leaves_no_half_folder(llama_folders, tmp_path, monkeypatch):
    from forgetless.merging import streaming

    base, variants = llama_folders
    config = validate_merge_config(
        base_config(base_model=str(base), models=[{"model": str(v)} for v in variants])
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        run_merge(config, tmp_path / "out")
    calls = []

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("disk full")

    monkeypatch.setattr(streaming.ShardedWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        run_merge(config, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"  # the old folder is untouched
    assert not list(tmp_path.glob(".tmp-out*"))


def test_unknown_model_spec(tmp_path):
    config = validate_merge_config({"merge_method": "average", "models": [{"model": "no-such-model-xyz"}]})
    with pytest.raises(InputError, match="model 'no-such-model-xyz' not found"):
        run_merge(config, tmp_path / "out")


def test_configs_built_in_code_are_checked_by_run_merge(tmp_path):
    from forgetless.merging import MergeConfig

    config = MergeConfig(
        merge_method="ties", models=[{"model": "a"}], parameters={"density": 2.0}, base_model="b"
    )
    with pytest.raises(InputError, match=r"density must be in \(0, 1\]"):
        run_merge(config, tmp_path / "out")
