"""LoRA-MoE: adapters become frozen experts of the adapters package's mixture layer."""

from __future__ import annotations

import json

import pytest
import torch

from forgetless.errors import InputError
from forgetless.merging import run_merge, validate_merge_config
from forgetless.mixing import run_mix, run_mix_outputs, validate_mix_config

IDS = torch.tensor([[1, 57, 300, 2000, 45, 9, 812], [1, 7, 7, 7, 4000, 12, 90]])


def logits_of_adapter(base, folder):
    from forgetless import load_model
    from forgetless.adapters import load_adapter

    model, _ = load_model(str(base))
    load_adapter(model, folder)
    with torch.no_grad():
        return model.eval()(IDS).logits


def logits_of_model(folder):
    from forgetless import load_model

    model, _ = load_model(str(folder))
    with torch.no_grad():
        return model(IDS).logits


def test_uniform_lora_moe_equals_the_dense_average_merge(mix_folders, mix_loras, tmp_path):
    base, _ = mix_folders
    config = validate_mix_config(
        {
            "base_model": str(base),
            "experts": [{"model": str(a)} for a in mix_loras],
            "router": "uniform",
            "top_k": 2,
        }
    )
    summary = run_mix(config, tmp_path / "moe")
    assert summary["kind"] == "lora_moe" and summary["modules"] == 4  # q_proj, up_proj x 2 layers
    manifest = json.loads((tmp_path / "moe" / "forgetless_adapter.json").read_text())
    assert manifest["config"]["kind"] == "moe_lora" and manifest["config"]["num_experts"] == 2
    # equal routing weights 1/2 for every token: W x + (s1 B1 A1 x + s2 B2 A2 x) / 2, the average merge
    merged = validate_merge_config(
        {"merge_method": "average", "base_model": str(base), "models": [{"model": str(a)} for a in mix_loras]}
    )
    run_merge(merged, tmp_path / "merged")
    torch.testing.assert_close(
        logits_of_adapter(base, tmp_path / "moe"), logits_of_model(tmp_path / "merged"), rtol=1e-4, atol=1e-5
    )


def test_identity_experts_take_their_share(mix_folders, mix_loras, tmp_path):
    base, _ = mix_folders
    config = validate_mix_config(
        {
            "base_model": str(base),
            "experts": [{"model": str(a)} for a in mix_loras],
            "router": "uniform",
            "top_k": 3,
            "num_identity_experts": 1,
        }
    )
    run_mix(config, tmp_path / "moe")
    # 1/3 each: the identity expert adds nothing, so the update is (delta_1 + delta_2) / 3
    merged = validate_merge_config(
        {
            "merge_method": "average",
            "base_model": str(base),
            "models": [{"model": str(a), "parameters": {"weight": 1 / 3}} for a in mix_loras],
            "parameters": {"normalize": False},
        }
    )
    run_merge(merged, tmp_path / "merged")
    torch.testing.assert_close(
        logits_of_adapter(base, tmp_path / "moe"), logits_of_model(tmp_path / "merged"), rtol=1e-4, atol=1e-5
    )


def test_hidden_and_trained_routers_on_lora_experts(mix_folders, mix_loras, tmp_path):
    from forgetless.tasks import get_task

    base, _ = mix_folders
    tasks = [get_task("fictional_facts"), get_task("kelvar_dates")]
    hidden = run_mix_outputs(str(base), [str(a) for a in mix_loras], tmp_path / "hidden", router="hidden", top_k=5,
                             tasks=tasks, prompts_per_expert=4)  # fmt: skip
    assert hidden["top_k"] == 2  # capped at the number of experts
    trained = run_mix_outputs(
        str(base), [str(a) for a in mix_loras], tmp_path / "trained", router="trained", top_k=2, tasks=tasks,
        prompts_per_expert=4, router_training={"steps": 6, "lr": 0.05, "batch_size": 4, "examples_per_expert": 6},
    )  # fmt: skip
    assert trained["router_steps"] == 6 and trained["router_loss_last"] < trained["router_loss_first"]
    from safetensors.torch import load_file

    start = load_file(tmp_path / "hidden" / "adapter.safetensors")
    learned = load_file(tmp_path / "trained" / "adapter.safetensors")
    routers = [key for key in start if key.endswith("router")]
    assert routers and not torch.equal(start[routers[0]], learned[routers[0]])
    experts = [key for key in start if "lora_A" in key or "lora_B" in key]
    assert experts and all(torch.equal(start[key], learned[key]) for key in experts)  # experts frozen
    logits_of_adapter(base, tmp_path / "trained")  # loads back


def test_lora_moe_errors(mix_folders, mix_loras, tmp_path):
    base, variants = mix_folders
    data = {"base_model": str(base), "experts": [{"model": str(mix_loras[0])}, {"model": str(variants[0])}],
            "router": "random", "top_k": 1}  # fmt: skip
    with pytest.raises(InputError, match="mixes full models and LoRA adapters"):
        run_mix(validate_mix_config(data), tmp_path / "out")
    data["experts"] = [{"model": str(a)} for a in mix_loras]
    data["dtype"] = "bfloat16"
    with pytest.raises(InputError, match="dtype applies to FFT-MoE"):
        run_mix(validate_mix_config(data), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="tasks has 1 entries for 2 experts"):
        run_mix_outputs(str(base), [str(a) for a in mix_loras], tmp_path / "out", tasks=[None])
