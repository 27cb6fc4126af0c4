"""The one reader of PEFT LoRA folders, for every command that takes one: ``eval --adapter`` and
``load_adapter`` (persist.py), ``merge`` and ``mix`` (merging/sources.py).

A folder is ``adapter_config.json`` plus ``adapter_model.safetensors`` (PEFT's key names,
``base_model.model.<module>.lora_A[.<adapter name>].weight``). Each module's rank is read from its
factors (so ``rank_pattern`` needs nothing more), its scaling from ``lora_alpha``,
``alpha_pattern`` and ``use_rslora`` as PEFT computes it, and ``fan_in_fan_out`` (Conv1D layers)
is recorded per module. Refused here, for every command alike, with the reason: other PEFT types,
DoRA, ``modules_to_save``, trained biases and tensors that are not LoRA factors. What a command
can do with the rest (a merge handles Conv1D deltas; injecting adapters needs ``nn.Linear``) is
the command's to say. PEFT's own loader needs the base model built first; this reads the files
alone, lazily, which a streaming merge needs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from forgetless.errors import InputError

if TYPE_CHECKING:
    from forgetless.merging.streaming import SafetensorsReader

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[\w-]+)?\.weight$")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer of a PEFT LoRA: ``delta W = scaling * B A`` (transposed for fan_in_fan_out)."""

    a_key: str
    b_key: str
    rank: int
    scaling: float
    fan_in_fan_out: bool

    def factors(self, reader: SafetensorsReader) -> tuple[Tensor, Tensor]:
        """``(A (r x d_in), B (d_out x r))`` as float32."""
        return reader.read(self.a_key).float(), reader.read(self.b_key).float()

    def delta(self, reader: SafetensorsReader) -> Tensor:
        """The dense update, shape of the base weight (``d_out x d_in``), float32."""
        a, b = self.factors(reader)
        delta = (b @ a).mul_(self.scaling)
        return delta.T.contiguous() if self.fan_in_fan_out else delta


@dataclass
class LoraAdapter:
    """A PEFT LoRA folder; ``modules`` maps base module names (``model.layers.0.self_attn.q_proj``) to factors."""

    spec: str
    folder: Path
    reader: SafetensorsReader
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    def delta_shape(self, module: str) -> tuple[int, int]:
        info = self.modules[module]
        shape = (self.reader.shape(info.b_key)[0], self.reader.shape(info.a_key)[1])
        return (shape[1], shape[0]) if info.fan_in_fan_out else shape


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not readable JSON ({error}); give a PEFT LoRA folder") from None
    refusals = [
        (config.get("peft_type", "LORA") != "LORA", f"peft_type {config.get('peft_type')} is not LORA"),
        (bool(config.get("use_dora")), "DoRA adapters (use_dora) are not plain LoRA"),
        (bool(config.get("modules_to_save")), "modules_to_save carries full weights beside the LoRA"),
        (config.get("bias", "none") != "none", f"bias '{config.get('bias')}' trains biases beside the LoRA"),
        (bool(config.get("alora_invocation_tokens")), "an aLoRA applies only after its invocation tokens"),
        (bool(config.get("layer_replication")), "layer_replication changes the base model's layers"),
        (bool(config.get("target_parameters")), "target_parameters adapts parameters, not linear layers"),
    ]
    for refused, why in refusals:
        if refused:
            raise InputError(f"{path}: {why}; only plain LoRA adapters are read (use peft for the rest)")
    return config


def read_peft_lora(folder: str | Path, spec: str | None = None) -> LoraAdapter:
    """Open the PEFT LoRA folder ``folder`` (``spec``: the name the user gave it, for messages).

    Raises:
        InputError: not a plain LoRA (see the module docstring), a tensor that is not a LoRA
            factor, a factor without its partner, or ranks of A and B that disagree.
    """
    from forgetless.merging.streaming import SafetensorsReader  # (merging imports adapters)

    folder = Path(folder)
    config = _read_config(folder)
    weights = folder / WEIGHTS_FILE
    reader = SafetensorsReader(folder, files=[weights]) if weights.exists() else SafetensorsReader(folder)
    adapter = LoraAdapter(spec or str(folder), folder, reader, config)
    parts: dict[str, dict[str, str]] = {}
    for key in reader.keys():
        match = _LORA_KEY.match(key)
        if match is None:
            raise InputError(
                f"{folder}: tensor '{key}' is not a LoRA factor (base_model.model.<module>.lora_A/B.weight); "
                "adapters with embedding LoRA or other trained tensors are not read"
            )
        parts.setdefault(match["module"], {})[match["factor"]] = key
    for module, keys in sorted(parts.items()):
        if set(keys) != {"A", "B"}:
            raise InputError(
                f"{folder}: module {module} has lora_{next(iter(keys))} but not its partner factor"
            )
        rank = reader.shape(keys["A"])[0]
        if reader.shape(keys["B"])[1] != rank:
            raise InputError(
                f"{folder}: module {module}: lora_A rank {rank} != lora_B rank {reader.shape(keys['B'])[1]}"
            )
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.modules[module] = LoraModule(
            keys["A"], keys["B"], rank, scaling, bool(config.get("fan_in_fan_out"))
        )
    if not adapter.modules:
        raise InputError(f"{folder}: the adapter holds no LoRA factors")
    return adapter
