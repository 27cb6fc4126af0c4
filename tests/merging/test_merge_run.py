"""run_merge end to end on tiny Llama folders: streaming equals in-memory, outputs load, LoRA maths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from forgetless.merging import merge_state_dicts, run_merge, validate_merge_config
from forgetless.merging.streaming import SafetensorsReader


def config(method, base, models, **extra):
    data = {"merge_method": method, "models": [{"model": str(m)} for m in models], **extra}
    if base is not None:
        data["base_model"] = str(base)
    return validate_merge_config(data)


def load_folder(folder):
    return SafetensorsReader(folder).read_all()


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("ties", {"density": 0.2}),
        ("dare_ties", {"density": 0.5}),
        ("average", {}),
        ("task_arithmetic", {"lambda": 0.7}),
    ],
)
def test_streamed_merge_equals_in_memory_merge_bit_for_bit(llama_folders, tmp_path, method, parameters):
    base, variants = llama_folders
    cfg = config(method, base, variants, parameters=parameters, max_shard_size="2MB", seed=4)
    summary = run_merge(cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert summary["shards"] > 1 and (out / "model.safetensors.index.json").exists()
    assert summary["merged_tensors"] == summary["tensors_written"] == 20
    streamed = load_folder(out)
    expected = merge_state_dicts(
        cfg, load_file(base / "model.safetensors"), [load_file(v / "model.safetensors") for v in variants]
    )
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name
    # the written shards are standard safetensors: the index covers every tensor
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    merged_once = {name: t.clone() for name, t in streamed.items()}
    run_merge(cfg, out, overwrite=True)  # same seed, same result
    assert all(torch.equal(load_folder(out)[n], t) for n, t in merged_once.items())


def test_merged_folder_loads_with_transformers_and_changes_dtype(llama_folders, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, variants = llama_folders
    run_merge(config("ties", base, variants, parameters={"density": 0.5}, dtype="bfloat16"), tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(tmp_path / "m") is not None
    assert (tmp_path / "m" / "merge_config.yaml").exists()
    reference = merge_state_dicts(
        config("ties", base, variants, parameters={"density": 0.5}, dtype="bfloat16"),
        load_file(base / "model.safetensors"),
        [load_file(v / "model.safetensors") for v in variants],
    )
    state = model.state_dict()
    assert torch.equal(
        state["model.layers.0.mlp.up_proj.weight"], reference["model.layers.0.mlp.up_proj.weight"]
    )


def test_merging_identical_models_returns_the_model(llama_folders, tmp_path):
    base, variants = llama_folders
    for method in ("ties", "task_arithmetic", "average", "dare"):
        cfg = config(method, base, [variants[0]] * 3, parameters={"weight": 1 / 3})
        run_merge(cfg, tmp_path / method)
        merged, original = load_folder(tmp_path / method), load_folder(variants[0])
        for name, tensor in original.items():
            torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6)


def test_base_model_listed_in_models_is_skipped_like_mergekit(llama_folders, tmp_path):
    base, variants = llama_folders
    with_base = config("ties", base, [base, *variants[:2]], parameters={"density": 0.5})
    without = config("ties", base, variants[:2], parameters={"density": 0.5})
    assert len(with_base.input_entries()) == 2
    run_merge(with_base, tmp_path / "a")
    run_merge(without, tmp_path / "b")
    a, b = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_tiny_alias_works_as_base_model(llama_folders, tmp_path):
    base, variants = llama_folders
    run_merge(config("task_arithmetic", "tiny-llama", variants[:1]), tmp_path / "m")
    # task arithmetic of one model with weight 1 against its own base gives the model back
    merged, original = load_folder(tmp_path / "m"), load_folder(variants[0])
    assert all(torch.allclose(merged[n], t, atol=1e-6) for n, t in original.items())


# ------------------------------------------------------------------------------------------ LoRA


def dense_deltas(base, adapters):
    """Per adapter: module -> scaling * B A, computed by PEFT's own merge (merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_state = load_file(base / "model.safetensors")
    out = []
    for adapter in adapters:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base), adapter
        ).merge_and_unload()
        state = model.state_dict()
        out.append({k.removesuffix(".weight"): state[k] - base_state[k] for k in base_state if "proj" in k})
    return out


def test_lora_merge_on_dense_deltas_equals_the_dense_computation(llama_folders, lora_folders, tmp_path):
    base, _ = llama_folders
    cfg = config("average", base, lora_folders, parameters={"weight": 1.0})
    cfg.models[1].parameters["weight"] = 2.0
    summary = run_merge(cfg, tmp_path / "m")
    assert summary["inputs"] == "lora" and summary["merged_tensors"] == 4  # q,v x 2 layers
    merged, base_state = load_folder(tmp_path / "m"), load_file(base / "model.safetensors")
    deltas = dense_deltas(base, lora_folders)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        # adapter 2 did not touch v_proj: it contributes a zero delta with its weight
        expected = sum(w * d.get(module, torch.zeros(())) for w, d in zip([1, 2, 1], deltas)) / 4
        torch.testing.assert_close(merged[f"{module}.weight"], base_state[f"{module}.weight"] + expected)
    assert torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"], base_state["model.layers.0.mlp.up_proj.weight"]
    )


def test_lora_output_by_svd_reconstructs_and_reports_the_error(llama_folders, lora_folders, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _ = llama_folders
    deltas = dense_deltas(base, lora_folders)
    # an average of ranks 4 + 4 + 2 has rank <= 10: represented exactly at out_rank 10
    exact = run_merge(config("average", base, lora_folders, output="lora", out_rank=10), tmp_path / "exact")
    assert exact["svd_relative_error"] < 1e-6
    # TIES works entry by entry, so its merged delta is full rank: truncation must show an error
    ties = run_merge(config("ties", base, lora_folders, output="lora", out_rank=10), tmp_path / "ties")
    assert 0.01 < ties["svd_relative_error"] < 1
    # rank 2 truncates: the reported error is ||D - D_2|| / ||D|| from the singular values
    summary = run_merge(config("average", base, lora_folders, output="lora", out_rank=2), tmp_path / "low")
    num, den = 0.0, 0.0
    for module in deltas[0]:
        if "q_proj" not in module and "v_proj" not in module:
            continue
        dense = sum(d.get(module, torch.zeros(())) for d in deltas) / 3
        singular = torch.linalg.svdvals(dense.double())
        num += float(singular[2:].pow(2).sum())
        den += float(singular.pow(2).sum())
    assert summary["svd_relative_error"] == pytest.approx((num / den) ** 0.5, rel=1e-4)
    assert 0 < summary["svd_relative_error"] < 1
    config_json = json.loads((tmp_path / "low" / "adapter_config.json").read_text())
    assert config_json["r"] == 2 and config_json["lora_alpha"] == 2
    # PEFT loads the rank-2 adapter; its merged weights are the truncated merge
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "low"
    ).merge_and_unload()
    module = "model.layers.0.self_attn.q_proj"
    dense = sum(d[module] for d in deltas) / 3
    u, s, vh = torch.linalg.svd(dense.double())
    best = (u[:, :2] * s[:2]) @ vh[:2]
    got = model.state_dict()[f"{module}.weight"] - load_file(base / "model.safetensors")[f"{module}.weight"]
    torch.testing.assert_close(got.double(), best, rtol=1e-4, atol=1e-5)


def test_lora_average_averages_factors_and_loads_in_peft(llama_folders, lora_folders, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _ = llama_folders
    adapters = lora_folders[:2]  # equal ranks
    run_merge(config("lora_average", base, adapters, output="lora"), tmp_path / "avg")
    out = load_folder(tmp_path / "avg")
    a_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    b_key = a_key.replace("lora_A", "lora_B")
    f0, f1 = load_folder(adapters[0]), load_folder(adapters[1])
    torch.testing.assert_close(out[a_key], (f0[a_key] + f1[a_key]) / 2)
    torch.testing.assert_close(out[b_key], (8 / 4 * f0[b_key] + 4 / 4 * f1[b_key]) / 2)  # scalings 2 and 1
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "avg")
    assert model is not None
    with pytest.raises(Exception, match="ranks"):
        run_merge(config("lora_average", base, lora_folders, output="lora"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
