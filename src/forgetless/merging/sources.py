"""Merge and mix inputs: model specs -> folders, full models and PEFT LoRA adapters, and the checks
that must pass before anything is written (architecture, tensor names and shapes, tokenizer).

A spec is anything ``forgetless.load_model`` accepts (alias, ``.gguf``, HF folder, hub id) or a
PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT key names).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from forgetless.adapters.peft_lora import LoraAdapter, LoraModule, read_peft_lora
from forgetless.errors import InputError
from forgetless.merging.streaming import SafetensorsReader

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def resolve_folder(spec: str, scratch: Path) -> Path:
    """The local folder for a spec: as given, converted from GGUF, built (tiny aliases) or downloaded.

    Args:
        spec: model spec or adapter folder.
        scratch: a temporary folder for tiny models built in code (deleted by the caller).
    """
    from forgetless.models import MODELS, load_model, resolve_model_folder

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise InputError(
                f"{path} is neither a Hugging Face model folder (config.json) nor a PEFT LoRA folder "
                "(adapter_config.json); give the folder written by save_pretrained"
            )
        return path
    if spec in MODELS and MODELS.get(spec).kind == "tiny":
        folder = scratch / spec
        if not folder.exists():
            model, tokenizer = load_model(spec)
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
        return folder
    folder = resolve_model_folder(spec)
    if folder is not None:
        return folder
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
            return Path(snapshot_download(spec, allow_patterns=patterns))
        except Exception as error:  # network, auth, missing repo: all mean "cannot use this spec"
            raise InputError(
                f"could not download '{spec}' from the Hugging Face hub ({str(error).splitlines()[0]}); "
                "check the id and your network, or download it and give the local folder"
            ) from None
    raise InputError(
        f"model '{spec}' not found: give an alias ({', '.join(MODELS.names())}), a .gguf file, "
        "an HF model folder, a PEFT LoRA folder or a hub id org/name"
    )


@dataclass
class FullModel:
    """A full HF model folder: its config.json and its safetensors weights."""

    spec: str
    folder: Path
    reader: SafetensorsReader
    config: dict


def open_source(spec: str, scratch: Path) -> FullModel | LoraAdapter:
    """Open a spec as a full model or, when its folder has adapter_config.json, as a LoRA adapter."""
    folder = resolve_folder(spec, scratch)
    if (folder / "adapter_config.json").exists():
        return read_peft_lora(folder, spec)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{folder}/config.json: not readable JSON ({error})") from None
    return FullModel(spec, folder, SafetensorsReader(folder), config)


def architecture(config: dict) -> str:
    return f"{config.get('model_type', '?')} ({', '.join(config.get('architectures') or ['?'])})"


def check_same_architecture(reference: FullModel, others: list[FullModel]) -> None:
    for other in others:
        if architecture(other.config) != architecture(reference.config):
            raise InputError(
                f"{other.spec}: architecture {architecture(other.config)} differs from {reference.spec}'s "
                f"{architecture(reference.config)}; merge models of one architecture"
            )


def check_same_tensors(reference: FullModel, others: list[FullModel]) -> None:
    """Every model must hold exactly the reference's tensor names with the same shapes."""
    names = set(reference.reader.keys())
    for other in others:
        other_names = set(other.reader.keys())
        if other_names != names:
            missing = sorted(names - other_names)
            extra = sorted(other_names - names)
            what = f"lacks tensor {missing[0]}" if missing else f"has extra tensor {extra[0]}"
            raise InputError(
                f"{other.spec}: {what} (compared with {reference.spec}); merge models of the same architecture and size"
            )
        for name in reference.reader.keys():
            if other.reader.shape(name) != reference.reader.shape(name):
                raise InputError(
                    f"{other.spec}: tensor {name} has shape {list(other.reader.shape(name))}, {reference.spec} "
                    f"has {list(reference.reader.shape(name))}; merge models of the same size"
                )


def tokenizer_fingerprint(folder: Path) -> str | None:
    """A hash of the vocabulary (tokens, ids, added tokens); None when the folder has no tokenizer.

    The vocabulary, not the file bytes: the same tokenizer saved by two library versions differs
    in formatting but maps text to the same ids, which is what merged weights depend on.
    """
    for name in _TOKENIZER_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name == "tokenizer.json":
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data.get("model", {})
            added = sorted((token.get("id"), token.get("content")) for token in data.get("added_tokens", []))
            blob = json.dumps([model.get("type"), model.get("vocab"), added], sort_keys=True)
            return hashlib.sha256(blob.encode()).hexdigest()
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def _tokenizer_bytes_hash(folder: Path) -> str | None:
    for name in _TOKENIZER_FILES:
        if (folder / name).exists():
            return hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return None


def check_same_tokenizer(reference: tuple[str, Path], others: list[tuple[str, Path]]) -> None:
    """Models whose folders carry a tokenizer must share the reference's vocabulary."""
    expected_bytes = _tokenizer_bytes_hash(reference[1])
    if expected_bytes is None:
        return
    expected = None
    for spec, folder in others:
        found_bytes = _tokenizer_bytes_hash(folder)
        if found_bytes is None or found_bytes == expected_bytes:  # identical files: no parsing needed
            continue
        expected = expected or tokenizer_fingerprint(reference[1])
        if tokenizer_fingerprint(folder) != expected:
            raise InputError(
                f"{spec}: its tokenizer's vocabulary differs from {reference[0]}'s; merged or mixed models "
                "must share one tokenizer (same token ids)"
            )


def check_lora_shapes(adapters: list[LoraAdapter], base: FullModel | None) -> None:
    """Adapters agree on every module's delta shape, and match the base weights when a base is given."""
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter in adapters:
        for module in adapter.modules:
            shape = adapter.delta_shape(module)
            if module in shapes and shapes[module][0] != shape:
                raise InputError(
                    f"{adapter.spec}: module {module} has delta shape {list(shape)}, {shapes[module][1]} has "
                    f"{list(shapes[module][0])}; the adapters were trained on different base models"
                )
            shapes.setdefault(module, (shape, adapter.spec))
            if base is not None:
                key = f"{module}.weight"
                if key not in base.reader:
                    raise InputError(
                        f"{adapter.spec}: adapts {module}, but base model {base.spec} has no tensor {key}; "
                        "set base_model to the model the adapter was trained on"
                    )
                if tuple(base.reader.shape(key)) != shape:
                    raise InputError(
                        f"{adapter.spec}: module {module} delta shape {list(shape)} != base {base.spec} tensor "
                        f"{key} {list(base.reader.shape(key))}; set base_model to the adapter's base"
                    )


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so random drops do not depend on the order tensors are merged in."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


def cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Cast floating tensors to the output dtype (integer buffers keep theirs)."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


__all__ = [
    "FullModel",
    "LoraAdapter",
    "LoraModule",
    "cast",
    "check_lora_shapes",
    "check_same_architecture",
    "check_same_tensors",
    "check_same_tokenizer",
    "open_source",
    "resolve_folder",
    "tensor_seed",
    "tokenizer_fingerprint",
]
