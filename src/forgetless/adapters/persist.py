"""Adapter folders: save, load, and PEFT interchange.

A forgetless adapter folder holds

- ``forgetless_adapter.json``: format version, the ``AdapterConfig``, the base model's name and
  ``model_type``, the wrapped module names with their (d_in, d_out), and every tensor's shape;
- ``adapter.safetensors``: experts, router, cluster state (``<module>.<tensor>`` keys);
- for kind ``lora`` also PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, so that
  ``peft.PeftModel.from_pretrained(base, folder)`` loads the same adapter.

``load_adapter`` reads either a forgetless folder or a plain PEFT LoRA folder. Every mismatch
(another base model, missing tensors, other shapes) is one ``InputError`` naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from forgetless.adapters.config import AdapterConfig
from forgetless.adapters.inject import (
    adapter_layers,
    adapter_state_dict,
    find_target_modules,
    inject_adapters,
    lora_factors,
    remove_adapters,
)
from forgetless.errors import InputError
from forgetless.io import atomic_dir, save_tensors, write_json

FORMAT = "forgetless-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "forgetless_adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _peft_key(module: str, factor: str) -> str:
    return f"base_model.model.{module}.{factor}.weight"


def _peft_base_model(spec: str | None) -> str | None:
    """What PEFT can resolve (``AutoPeftModelForCausalLM``): a forgetless alias, a .gguf file or
    a local folder becomes the absolute local HF folder it loads from (a path of this machine:
    forgetless's own manifest keeps the spec as the user wrote it); hub ids stay as given."""
    if spec is None:
        return None
    from forgetless.models.load import resolve_model_folder

    try:
        folder = resolve_model_folder(spec)
    except InputError:
        return spec
    return str(folder.resolve()) if folder is not None else spec


def write_peft_lora(
    folder: Path,
    factors: dict[str, tuple[Tensor, Tensor, float]],
    base_model_name_or_path: str | None,
    dropout: float = 0.0,
) -> None:
    """Write PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` into ``folder``.

    Args:
        factors: module name -> (A (r, d_in), B (d_out, r), scaling); one rank and one scaling for
            all modules (PEFT's ``r`` and ``lora_alpha = scaling * r``).
        base_model_name_or_path: written as is into the config.

    Raises:
        InputError: the modules differ in rank or scaling.
    """
    from peft import LoraConfig

    ranks = {a.shape[0] for a, _, _ in factors.values()}
    scalings = {round(scaling, 12) for _, _, scaling in factors.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise InputError(
            "the LoRA layers differ in rank or scaling; PEFT's single r / lora_alpha cannot describe them"
        )
    rank = ranks.pop()
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=scalings.pop() * rank,
        lora_dropout=dropout,
        target_modules=sorted(factors),  # full names: PEFT adapts exactly these modules
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    peft_config.save_pretrained(str(folder))
    tensors = {}
    for module, (a, b, _) in factors.items():
        tensors[_peft_key(module, "lora_A")] = a
        tensors[_peft_key(module, "lora_B")] = b
    save_tensors(folder / PEFT_WEIGHTS_FILE, tensors, metadata={"format": "pt"})


def _write_peft_files(model: nn.Module, folder: Path, base_model: str | None) -> None:
    factors = lora_factors(model)
    if not factors:
        raise InputError(
            "the model has no LoRA adapter to export; inject_adapters(model, AdapterConfig.lora()) first"
        )
    first = next(iter(adapter_layers(model).values())).config
    write_peft_lora(folder, factors, _peft_base_model(base_model), first.dropout)


def export_peft_lora(
    model: nn.Module, folder: str | os.PathLike, base_model: str | None = None, overwrite: bool = False
) -> Path:
    """Write the model's LoRA adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Raises:
        InputError: the adapters are not of kind lora, or ``folder`` exists and ``overwrite`` is False.
    """
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        _write_peft_files(model, tmp, base_model)
    return folder


def save_adapter(
    model: nn.Module, folder: str | os.PathLike, base_model: str, overwrite: bool = False
) -> Path:
    """Save every adapter of ``model`` to ``folder`` (written whole or not at all).

    Args:
        base_model: the spec the base was loaded from (an alias, a path or a hub id); recorded
            and checked by ``load_adapter(..., base_model=...)``.

    Raises:
        InputError: the model has no adapters, or ``folder`` exists and ``overwrite`` is False.
    """
    layers = adapter_layers(model)
    if not layers:
        raise InputError("the model has no adapters to save; call inject_adapters(model, config) first")
    configs = {json.dumps(layer.config.shared().model_dump(), sort_keys=True) for layer in layers.values()}
    if len(configs) != 1:
        raise InputError("the model's adapters were injected with different configs; save them one at a time")
    config = next(iter(layers.values())).config.shared()
    state = adapter_state_dict(model)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config.model_dump(),
        "base_model": base_model,
        "model_type": _model_type(model),
        "modules": {name: [layer.in_features, layer.out_features] for name, layer in layers.items()},
        "tensors": {key: list(tensor.shape) for key, tensor in state.items()},
    }
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, state, metadata={"format": FORMAT})
        if next(iter(layers.values())).single_delta:  # one low-rank update: PEFT reads it too
            _write_peft_files(model, tmp, base_model)
        write_json(tmp / CONFIG_FILE, manifest)
    return folder


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InputError(f"{path} is missing; the adapter folder is incomplete (save it again)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise InputError(
            f"{path} is not a readable safetensors file ({error}); save the adapter again"
        ) from None


def saved_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """The adapter config of a manifest, read as it was trained: a sample-gated adapter saved
    before per-task gate statistics existed kept one shared set, and one saved before per-stage
    experts existed one set of experts for all stages."""
    config = dict(manifest.get("config", {}))
    if config.get("yield_pooling") == "sample" and "gate_statistics" not in config:
        config["gate_statistics"] = "shared"
    if config and "stage_experts" not in config:
        config["stage_experts"] = "shared"
    return config


def _check_base(manifest_base: str | None, base_model: str | None, where: Path) -> None:
    # a PEFT folder names the alias's local folder (``_peft_base_model``): compare both resolved
    same = str(manifest_base) == str(base_model) or (
        _peft_base_model(str(manifest_base)) == _peft_base_model(str(base_model))
    )
    if base_model is not None and manifest_base is not None and not same:
        raise InputError(
            f"{where}: the adapter was made for base model '{manifest_base}', not '{base_model}'; "
            "load it on that model"
        )


def _check_modules(model: nn.Module, modules: dict[str, list[int]], where: Path) -> None:
    """Every recorded module exists in ``model`` as an nn.Linear of the recorded (d_in, d_out)."""
    for name, (d_in, d_out) in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputError(
                f"{where}: module {name} does not exist in this model; the adapter belongs to another base model"
            ) from None
        shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if shape != (d_in, d_out):
            raise InputError(
                f"{where}: {name} is {shape[0]} -> {shape[1]} in this model but {d_in} -> {d_out} in the "
                "adapter; it was made for another base model"
            )


def _inject_and_fill(
    model: nn.Module, config: AdapterConfig, tensors: dict[str, Tensor], where: Path
) -> list[str]:
    """Inject ``config`` and copy ``tensors`` in; on any mismatch undo the injection and raise."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    names = inject_adapters(model, config)
    try:
        expected = _live_state(model)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise InputError(
                f"{where}: tensor {missing[0]} is missing ({len(missing)} in all); save the adapter again"
            )
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise InputError(
                f"{where}: tensor {unexpected[0]} belongs to no adapter of this model; "
                "the folder was made for another model or config"
            )
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise InputError(
                    f"{where}: tensor {key} has shape {list(tensor.shape)}, the model needs "
                    f"{list(expected[key].shape)}; the adapter was made for another base model or rank"
                )
        with torch.no_grad():
            for key, tensor in tensors.items():
                expected[key].copy_(tensor.to(expected[key].dtype))
        for layer in adapter_layers(model).values():
            layer.after_load()
    except BaseException:
        remove_adapters(model, names)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable.get(name, parameter.requires_grad))
        raise
    return names


def _live_state(model: nn.Module) -> dict[str, Tensor]:
    """``adapter_state_dict`` but with the live tensors (to copy into), not detached copies."""
    state = {}
    for name, layer in adapter_layers(model).items():
        for key, tensor in layer.state_dict(keep_vars=True).items():
            if not key.startswith("base_layer."):
                state[f"{name}.{key}"] = tensor
    return state


def _load_forgetless(model: nn.Module, folder: Path, base_model: str | None) -> list[str]:
    path = folder / CONFIG_FILE
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error}); save the adapter again") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: format {manifest.get('format')} v{manifest.get('version')} is not "
            f"{FORMAT} v{FORMAT_VERSION}; save it with this forgetless version"
        )
    config = AdapterConfig.from_dict(saved_config(manifest), source=str(path))
    _check_base(manifest.get("base_model"), base_model, path)
    saved_type, model_type = manifest.get("model_type"), _model_type(model)
    if saved_type and model_type and saved_type != model_type:
        raise InputError(
            f"{path}: the adapter was made for a {saved_type} model ('{manifest.get('base_model')}'), "
            f"this model is {model_type}; load it on its base model"
        )
    modules = manifest.get("modules", {})
    _check_modules(model, modules, path)
    found = find_target_modules(model, config.target_modules)
    if found != list(modules):
        raise InputError(
            f"{path}: target_modules match {len(found)} modules here but the adapter has {len(modules)}; "
            "it was made for another base model"
        )
    tensors = _read_tensors(folder / WEIGHTS_FILE)
    return _inject_and_fill(model, config, tensors, path)


def _load_peft(model: nn.Module, folder: Path, base_model: str | None) -> list[str]:
    """A PEFT LoRA folder, read by the one reader (``peft_lora.read_peft_lora``), as one LoRA adapter."""
    from forgetless.adapters.lora import pad_rank
    from forgetless.adapters.peft_lora import pattern_value, read_peft_lora

    adapter = read_peft_lora(folder)
    path, config = folder / PEFT_CONFIG_FILE, adapter.config
    if any(module.fan_in_fan_out for module in adapter.modules.values()):
        raise InputError(
            f"{path}: fan_in_fan_out adapters are for Conv1D layers, and adapters here wrap nn.Linear; "
            "merge it into its base model with forgetless merge instead"
        )
    _check_base(config.get("base_model_name_or_path"), base_model, path)
    factors = {name: module.factors(adapter.reader) for name, module in adapter.modules.items()}
    modules = {name: [a.shape[1], b.shape[0]] for name, (a, b) in factors.items()}
    _check_modules(model, modules, path)
    ranks = {module.rank for module in adapter.modules.values()}
    scalings = {module.scaling for module in adapter.modules.values()}
    rank = max(ranks)
    if len(ranks) == 1 and len(scalings) == 1:
        first = next(iter(adapter.modules))  # every module has the same rank and alpha
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, first, config.get("lora_alpha", rank)))
        # rsLoRA scales by alpha / sqrt(r); our config's alpha / r gives that with alpha * sqrt(r)
        alpha = alpha * math.sqrt(rank) if config.get("use_rslora") else alpha
        folded = None
    else:
        # per-module ranks or alphas (rank_pattern / alpha_pattern): one config of the largest
        # rank with scaling 1; each module's A and B padded with zeros to it (B A is unchanged)
        # and its own scaling folded into B
        alpha, folded = float(rank), {name: module.scaling for name, module in adapter.modules.items()}
    tensors = {}
    for name, (a, b) in factors.items():
        a, b = pad_rank(a, b, rank)
        tensors[f"{name}.lora_A"] = a
        tensors[f"{name}.lora_B"] = b * folded[name] if folded else b
    lora = AdapterConfig.lora(
        r=rank,
        alpha=alpha,
        target_modules=[re.escape(name) for name in modules],
        dropout=float(config.get("lora_dropout") or 0.0),
    )
    return _inject_and_fill(model, lora, tensors, folder / PEFT_WEIGHTS_FILE)


def recorded_base_model(folder: str | os.PathLike) -> str | None:
    """The base model an adapter folder says it was trained on (forgetless's manifest, else
    PEFT's ``base_model_name_or_path``), or None when it says nothing or is no adapter folder."""
    folder = Path(folder)
    for name, key in ((CONFIG_FILE, "base_model"), (PEFT_CONFIG_FILE, "base_model_name_or_path")):
        try:
            recorded = json.loads((folder / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        return str(recorded) if recorded else None
    return None


def same_base_model(first: str, second: str) -> bool:
    """Whether two model specs name the same model as far as names tell (an alias, a .gguf and
    the local folder they load from are the same; a hub id and a local copy of it are not)."""
    return first == second or _peft_base_model(first) == _peft_base_model(second)


def load_adapter(model: nn.Module, folder: str | os.PathLike, base_model: str | None = None) -> nn.Module:
    """Inject the adapter saved in ``folder`` into ``model`` and load its weights; returns ``model``.

    ``folder`` is a forgetless adapter folder or a plain PEFT LoRA folder. With ``base_model`` given,
    an adapter recorded for another base model is refused.

    Raises:
        InputError: not an adapter folder, another base model, missing tensors or other shapes.
    """
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        _load_forgetless(model, folder, base_model)
    elif (folder / PEFT_CONFIG_FILE).is_file():
        _load_peft(model, folder, base_model)
    else:
        raise InputError(
            f"{folder} is not an adapter folder (no {CONFIG_FILE} or {PEFT_CONFIG_FILE}); "
            "give a folder written by save_adapter or a PEFT LoRA folder"
        )
    return model
