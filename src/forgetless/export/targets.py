"""The registry of export targets (``forgetless export --for NAME``) and what a target is given.

A target is one function ``write(job, folder) -> dict`` registered with
``@EXPORT_TARGETS.register(name)``: it writes the engine's files into ``folder`` (a temp folder
that becomes ``--out`` once everything is written) and returns what the manifest should add.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from forgetless.export.experts import Factors
from forgetless.export.layout import Layout
from forgetless.registry import Registry


@dataclass(frozen=True)
class ExportJob:
    """What every target writes from: the loaded model (eval mode, adapters injected), its
    tokenizer, its adapter layout, the PEFT factors of every exported adapter, and the final
    absolute path of the base folder (recorded in the adapters' configs)."""

    model: nn.Module
    tokenizer: Any
    layout: Layout
    factors: dict[str, Factors]
    base_path: Path


Target = Callable[[ExportJob, Path], dict]
EXPORT_TARGETS: Registry[Target] = Registry("export target", package="forgetless.export")
