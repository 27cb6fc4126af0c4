"""Fixtures for mixing tests: a tiny Llama base, fine-tune-like variants, and LoRA adapters on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def perturb(model, seed: int, scale: float = 0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="session")
def mix_folders(tmp_path_factory):
    """(base folder, [two variant folders]) of tiny-llama."""
    from forgetless import load_model

    root = tmp_path_factory.mktemp("mix")
    model, tokenizer = load_model("tiny-llama", seed=0)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    variants = []
    for index in range(2):
        variant, _ = load_model("tiny-llama", seed=0)
        perturb(variant, seed=200 + index).save_pretrained(root / f"ft{index}")
        tokenizer.save_pretrained(root / f"ft{index}")
        variants.append(root / f"ft{index}")
    return root / "base", variants


def make_lora(base_folder: Path, folder: Path, seed: int, rank: int, alpha: float) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "up_proj"])
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def mix_loras(mix_folders, tmp_path_factory):
    base, _ = mix_folders
    root = tmp_path_factory.mktemp("mix_loras")
    return [
        make_lora(base, root / "a", seed=1, rank=4, alpha=8),
        make_lora(base, root / "b", seed=2, rank=2, alpha=2),
    ]
