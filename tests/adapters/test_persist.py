"""Adapter folders: save/load round trips, PEFT interchange, and the errors for wrong folders."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import logits, randomize_adapters
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    adapter_layers,
    adapter_state_dict,
    export_peft_lora,
    inject_adapters,
    load_adapter,
    save_adapter,
)
from forgetless.errors import InputError


@pytest.fixture()
def saved_lora(tiny, tmp_path, batch):
    """A randomised LoRA adapter saved from a tiny model: (folder, alias, logits with the adapter)."""
    model, alias = tiny
    inject_adapters(model, AdapterConfig.lora(r=4, alpha=8))
    randomize_adapters(model, scale=0.3)
    folder = save_adapter(model, tmp_path / "adapter", base_model=alias)
    return folder, alias, logits(model, batch)


def test_lora_round_trip_gives_identical_logits(saved_lora, batch):
    folder, alias, expected = saved_lora
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
        "adapter_model.safetensors",
        "forgetless_adapter.json",
    ]
    fresh, _ = load_model(alias, seed=0)
    load_adapter(fresh, folder, base_model=alias)
    assert torch.equal(logits(fresh, batch), expected)


def test_peft_loads_our_lora_folder(saved_lora, batch):
    folder, alias, expected = saved_lora
    peft_model = PeftModel.from_pretrained(load_model(alias, seed=0)[0], str(folder))
    torch.testing.assert_close(logits(peft_model, batch), expected, atol=1e-5, rtol=0)


def _saved_peft(model, config, folder, batch):
    """A PEFT LoRA with random B saved to ``folder``; returns its logits on ``batch``."""
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    peft_model.eval()
    peft_model.save_pretrained(folder)
    return logits(peft_model, batch)


def test_we_load_a_plain_peft_folder(tiny, tmp_path, batch):
    model, alias = tiny
    config = PeftLoraConfig(r=4, lora_alpha=16, target_modules=["up_proj", "v_proj"], use_rslora=True)
    expected = _saved_peft(model, config, tmp_path / "peft", batch)
    fresh, _ = load_model(alias, seed=0)
    load_adapter(fresh, tmp_path / "peft")
    assert set(adapter_layers(fresh)) == {
        f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.up_proj", "self_attn.v_proj")
    }
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-5, rtol=0)


def test_per_module_ranks_and_alphas_load_as_peft_computes_them(tiny, tmp_path, batch):
    """rank_pattern / alpha_pattern: the one PEFT reader (adapters/peft_lora.py) gives each module
    its own rank and scaling, as ``forgetless merge`` reads the same folder."""
    from forgetless.adapters.peft_lora import read_peft_lora

    model, alias = tiny
    config = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["up_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"up_proj": 24},
    )
    expected = _saved_peft(model, config, tmp_path / "peft", batch)
    read = read_peft_lora(tmp_path / "peft")
    scalings = {name.rsplit(".", 1)[-1]: (m.rank, m.scaling) for name, m in read.modules.items()}
    assert scalings == {"up_proj": (4, 6.0), "v_proj": (2, 4.0)}
    fresh, _ = load_model(alias, seed=0)
    load_adapter(fresh, tmp_path / "peft")
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-5, rtol=0)


def test_an_alpha_pattern_that_matches_every_module_sets_the_scaling(tiny, tmp_path, batch):
    model, alias = tiny
    config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["up_proj", "v_proj"], alpha_pattern={"up_proj": 24, "v_proj": 24}
    )
    expected = _saved_peft(model, config, tmp_path / "peft", batch)
    fresh, _ = load_model(alias, seed=0)
    load_adapter(fresh, tmp_path / "peft")
    assert {layer.scaling for layer in adapter_layers(fresh).values()} == {6.0}
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-5, rtol=0)


def test_export_peft_lora_alone(tiny, tmp_path):
    model, alias = tiny
    inject_adapters(model, AdapterConfig.lora(r=2))
    folder = export_peft_lora(model, tmp_path / "peft", base_model=alias)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == alias
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in keys
    assert len(keys) == 12


def test_existing_folder_is_not_overwritten(saved_lora, tiny):
    folder, alias, _ = saved_lora
    model, _ = load_model(alias, seed=0)
    inject_adapters(model, AdapterConfig.lora(r=4))
    with pytest.raises(InputError, match="already exists"):
        save_adapter(model, folder, base_model=alias)


def test_another_base_model_is_refused(saved_lora):
    folder, alias, _ = saved_lora
    other = "tiny-gemma3" if alias == "tiny-llama" else "tiny-llama"
    model, _ = load_model(other, seed=0)
    with pytest.raises(InputError, match="made for a .* model"):
        load_adapter(model, folder)
    with pytest.raises(InputError, match=f"made for base model '{alias}', not '{other}'"):
        load_adapter(model, folder, base_model=other)
    assert not adapter_layers(model)


def test_missing_tensor_is_refused_and_model_left_clean(saved_lora):
    folder, alias, _ = saved_lora
    tensors = load_file(folder / "adapter.safetensors")
    tensors.pop("model.layers.1.mlp.down_proj.lora_B")
    save_file(tensors, folder / "adapter.safetensors")
    model, _ = load_model(alias, seed=0)
    with pytest.raises(InputError, match=r"tensor model.layers.1.mlp.down_proj.lora_B is missing"):
        load_adapter(model, folder)
    assert not adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_shape_mismatch_is_refused(saved_lora):
    folder, alias, _ = saved_lora
    tensors = load_file(folder / "adapter.safetensors")
    tensors["model.layers.0.mlp.up_proj.lora_A"] = torch.zeros(4, 31)
    save_file(tensors, folder / "adapter.safetensors")
    with pytest.raises(InputError, match=r"up_proj.lora_A has shape \[4, 31\], the model needs \[4, 32\]"):
        load_adapter(load_model(alias, seed=0)[0], folder)


def test_not_an_adapter_folder(tmp_path, tiny):
    model, _ = tiny
    with pytest.raises(InputError, match="is not an adapter folder"):
        load_adapter(model, tmp_path)


def test_state_dict_holds_only_adapter_tensors(tiny):
    model, _ = tiny
    inject_adapters(model, AdapterConfig.lora(r=4))
    state = adapter_state_dict(model)
    assert len(state) == 12 and all(key.endswith(("lora_A", "lora_B")) for key in state)


def test_auto_peft_model_loads_a_lora_saved_for_an_alias(default_model, tmp_path):
    """adapter_config.json names what PEFT can resolve (the alias's local folder); forgetless's own
    manifest keeps the alias."""
    from peft import AutoPeftModelForCausalLM

    model, tokenizer = load_model("smollm2-135m-instruct")  # a copy: the session's model stays bare
    inject_adapters(model, AdapterConfig.lora(r=2, alpha=4, target_modules=["down_proj"]))
    randomize_adapters(model, scale=0.05)
    folder = save_adapter(model, tmp_path / "adapter", base_model="smollm2-135m-instruct")
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    assert (
        json.loads((folder / "forgetless_adapter.json").read_text())["base_model"] == "smollm2-135m-instruct"
    )
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, expected, atol=1e-4, rtol=0)
    # a PEFT-only folder still loads when its alias is named as the base
    peft_only = export_peft_lora(model, tmp_path / "peft", base_model="smollm2-135m-instruct")
    fresh, _ = load_model("smollm2-135m-instruct")
    load_adapter(fresh, peft_only, base_model="smollm2-135m-instruct")
    with pytest.raises(InputError, match="made for base model"):
        load_adapter(load_model("tiny-llama")[0], peft_only, base_model="tiny-llama")


def test_an_adapter_of_another_named_base_loads_with_a_note(saved_lora, tmp_path, capsys):
    from forgetless.evaluation.run import load_model_and_adapter

    folder, alias, _ = saved_lora
    load_model_and_adapter(alias, folder)  # its own base: no note
    assert "note" not in capsys.readouterr().err
    peft_only = tmp_path / "peft_only"
    peft_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (peft_only / name).write_bytes((folder / name).read_bytes())
    config = json.loads((peft_only / "adapter_config.json").read_text())
    (peft_only / "adapter_config.json").write_text(
        json.dumps(dict(config, base_model_name_or_path="org/other"))
    )
    load_model_and_adapter(alias, peft_only)  # same shapes, another name: loads, and says so
    err = capsys.readouterr().err
    assert "trained on 'org/other'" in err and f"'{alias}'" in err
