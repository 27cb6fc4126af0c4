"""``--for vllm``: a Hugging Face base folder, PEFT LoRA adapters and the router (vLLM, SGLang, TGI).

The output folder holds:

    OUT/base/             save_pretrained of the base model (adapter layers swapped for their base
                          layers; earlier stages merged into it stay merged) and of the tokenizer
    OUT/adapters/NAME/    adapter_config.json + adapter_model.safetensors, stock PEFT LoRA
    OUT/router.json       the gate's statistics (router_state.py)
    OUT/router.py         the self-contained router (a copy of forgetless/export/router.py)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

from torch import nn

from forgetless.adapters import adapter_layers
from forgetless.adapters.persist import write_peft_lora
from forgetless.export.router_state import max_lora_rank, router_state, serve_command
from forgetless.export.targets import EXPORT_TARGETS, ExportJob
from forgetless.io import write_text


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextmanager
def without_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every adapter layer swapped for the ``nn.Linear`` it wraps; put back after."""
    layers = adapter_layers(model)
    for name, layer in layers.items():
        _replace(model, name, layer.base_layer)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            _replace(model, name, layer)


def save_base(model: nn.Module, tokenizer, folder: Path) -> None:  # noqa: ANN001
    """The base model and tokenizer as a standard Hugging Face folder."""
    with without_adapters(model):
        model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    for path in folder.iterdir():  # some writers leave 0600 files; artifacts are meant to be shared
        path.chmod(0o644)


@EXPORT_TARGETS.register("vllm")
def write_vllm(job: ExportJob, folder: Path) -> dict:
    """Write the base folder, the adapters and the router; returns the serve command."""
    save_base(job.model, job.tokenizer, folder / "base")
    for adapter in job.layout.adapters:
        target = folder / "adapters" / adapter.name
        target.mkdir(parents=True)
        write_peft_lora(target, job.factors[adapter.name], str(job.base_path))
    ranks = [(adapter.name, adapter.rank) for adapter in job.layout.adapters]
    command = serve_command(ranks)
    write_text(folder / "router.json", json.dumps(router_state(job.layout, command)) + "\n")
    write_text(folder / "router.py", files("forgetless.export").joinpath("router.py").read_text("utf-8"))
    return {"serve_command": command, "max_lora_rank": max_lora_rank(ranks) if ranks else None}
