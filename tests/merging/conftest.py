"""Fixtures for merging tests: tiny Llama folders (a base and fine-tune-like variants) and LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def perturb(model, seed: int, scale: float = 0.02):
    """Add a seeded 'task vector' to every floating parameter (a stand-in for a fine-tune)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_folders(tmp_path_factory):
    """(base folder, [three variant folders]) of tiny-llama."""
    from forgetless import load_model

    root = tmp_path_factory.mktemp("llamas")
    model, tokenizer = load_model("tiny-llama", seed=0)
    base = save(model, tokenizer, root / "base")
    variants = []
    for index in range(3):
        variant, _ = load_model("tiny-llama", seed=0)
        variants.append(save(perturb(variant, seed=100 + index), tokenizer, root / f"ft{index}"))
    return base, variants


def make_lora(
    base_folder: Path, folder: Path, seed: int, rank: int, alpha: float, targets: list[str]
) -> Path:
    """A PEFT LoRA adapter on the tiny base with random (non-zero) A and B factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def lora_folders(llama_folders, tmp_path_factory):
    """Three adapters on the tiny base: ranks 4/4/2, different alphas, one adapter without v_proj."""
    base, _ = llama_folders
    root = tmp_path_factory.mktemp("loras")
    return [
        make_lora(base, root / "lora0", seed=1, rank=4, alpha=8, targets=["q_proj", "v_proj"]),
        make_lora(base, root / "lora1", seed=2, rank=4, alpha=4, targets=["q_proj", "v_proj"]),
        make_lora(base, root / "lora2", seed=3, rank=2, alpha=16, targets=["q_proj"]),
    ]
