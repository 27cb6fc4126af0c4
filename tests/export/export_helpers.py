"""Helpers of the export tests: adapters with random weights, a two-stage SLIM model, stock loading."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

from forgetless import load_model
from forgetless.adapters import AdapterConfig, inject_adapters, open_gate_task, trainable_parameters
from forgetless.adapters.gate import prompt_boundary
from forgetless.data.formatting import PromptFormatter

STAGE_A = ["zorb the glorp twice", "what does kelvar mean", "glorp 3 and 4", "name the zorbian topic"]
STAGE_B = [
    "What is the capital of Peru?",
    "Name the capital of Chile.",
    "Capital of Spain?",
    "Which city rules Japan?",
]
OTHER = ["Tell me a joke about cats", "Write a poem about the sea", "glorp 7 and 9", "Spell the word house"]


def randomize(model, seed: int, scale: float = 0.3) -> None:
    """Random values for every trainable adapter tensor (fresh LoRA B is zero, which hides bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in trainable_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def train_gate(model, formatter: PromptFormatter, texts: list[str]) -> None:
    """Gate passes in train mode: the clusters and moments learn these prompts."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            for text in texts:
                prompt = formatter.prompt_ids(text)
                with prompt_boundary(model, torch.tensor([[True] * len(prompt) + [False] * 2])):
                    model(input_ids=torch.tensor([prompt + [11, 12]]))
    model.eval()


def two_stage_slim():
    """A SLIM model with per-stage experts after two stages (stage A's experts frozen)."""
    model, tokenizer = load_model("tiny-llama", seed=0)
    config = AdapterConfig.slim(r=4, num_experts=3, stage_experts="per_task", yield_threshold=50.0)
    inject_adapters(model, config, tokenizer=tokenizer)
    formatter = PromptFormatter(tokenizer)
    randomize(model, seed=3)
    train_gate(model, formatter, STAGE_A)
    assert open_gate_task(model) == 1
    randomize(model, seed=4)
    train_gate(model, formatter, STAGE_B)
    return model, tokenizer, formatter


def stock_model(out: Path, adapter: str | None = None):
    """The export as a GPU engine loads it: stock transformers, plus stock PEFT for an adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    if adapter is not None:
        with warnings.catch_warnings():  # PEFT calls an API transformers 5 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, out / "adapters" / adapter).eval()
    return model


def import_file(path: Path, name: str):
    """A Python file as a module, imported the way a user of the export folder would."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
