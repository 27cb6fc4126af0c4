"""``load_model(spec) -> (model, tokenizer)`` for every kind of model spec.

A spec is one of:

- a built-in alias (``forgetless models`` lists them): ``smollm2-135m-instruct``, ``gemma3-270m``,
  ``tiny-llama``, ``tiny-qwen2``, ``tiny-gemma3``;
- a local ``.gguf`` file (converted once to a cached safetensors folder);
- a local Hugging Face folder (``config.json`` + safetensors);
- a Hugging Face hub id (``org/name``), downloaded by transformers where a hub is reachable.

Weights load as fp32 unless ``dtype`` says otherwise. ``trust_remote_code`` is off unless the
caller asks. The tokenizer always has a pad token (the EOS token when it defines none).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from forgetless.errors import InputError, MissingDependencyError
from forgetless.io import atomic_dir
from forgetless.models.aliases import DEFAULT_MODEL, MODELS, BuiltinModel
from forgetless.models.cache import convert_gguf, forgetless_home
from forgetless.models.tiny import build_tiny_model
from forgetless.registry import did_you_mean

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer, cached as a small HF tokenizer folder (used by the tiny models)."""
    folder = forgetless_home() / "tokenizers" / "smollm2"
    default = MODELS.get(DEFAULT_MODEL)
    if not (folder / "tokenizer_config.json").exists():
        if default.is_cached():
            source = AutoTokenizer.from_pretrained(default.cache_dir())
        else:
            gguf = default.gguf_path()
            source = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with atomic_dir(folder, overwrite=True) as tmp:
            source.save_pretrained(tmp)
    return _with_pad(AutoTokenizer.from_pretrained(folder))


def _with_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quiet_transformers() -> None:
    """No transformers progress bars (one per shard on every load and save clutters every command),
    unless FORGETLESS_VERBOSE is set."""
    if not os.environ.get("FORGETLESS_VERBOSE"):
        transformers_logging.disable_progress_bar()


def _load_folder(
    folder: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool, **kwargs: object
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    model.eval()
    return model, _with_pad(tokenizer)


def _load_alias(
    alias: BuiltinModel, dtype: torch.dtype, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if alias.kind == "tiny":
        tokenizer = smollm2_tokenizer()
        model = build_tiny_model(
            alias.architecture,
            vocab_size=len(tokenizer),
            bos=tokenizer.bos_token_id,
            eos=tokenizer.eos_token_id,
            pad=tokenizer.pad_token_id,
            seed=seed,
        )
        model.config.name_or_path = alias.name
        return model.to(dtype), tokenizer
    return _load_folder(alias.materialize(), dtype, trust_remote_code=False)


def resolve_model_folder(spec: str) -> Path | None:
    """The local HF folder a spec stands for (converting GGUF if needed); None for hub ids / tiny models."""
    if spec in MODELS:
        alias = MODELS.get(spec)
        return None if alias.kind == "tiny" else alias.materialize()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        return path
    return None


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an alias, a ``.gguf`` file, an HF folder or a hub id.

    Args:
        spec: what to load (see the module docstring).
        dtype: weight dtype (``torch.float32`` by default; ``"bfloat16"`` etc. accepted).
        trust_remote_code: allow model code from the folder / hub (never on by default).
        seed: weight seed for the tiny random models; ignored for real models.

    Raises:
        InputError: the spec is none of the above, names a missing file, or a folder without
            ``config.json``. ``MissingDependencyError`` when an alias needs a package not installed.
    """
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise InputError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    spec = str(spec)
    if spec in MODELS:
        return _load_alias(MODELS.get(spec), dtype, seed)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"model file {path} does not exist; give the path of a .gguf file")
        return _load_folder(convert_gguf(path), dtype, trust_remote_code)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(
                f"{path} is not a Hugging Face model folder (no config.json); "
                "give a folder written by save_pretrained, a .gguf file, or an alias"
            )
        return _load_folder(path, dtype, trust_remote_code)
    if path.exists():
        raise InputError(f"{path} is neither a .gguf file nor a model folder")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        try:
            return _load_folder(spec, dtype, trust_remote_code)
        except OSError as error:
            raise InputError(
                f"could not load '{spec}' from the Hugging Face hub ({str(error).splitlines()[0]}); "
                "check the id and your network, or download it and pass the local folder"
            ) from error
    raise InputError(
        f"unknown model '{spec}'.{did_you_mean(spec, MODELS.names())} Give an alias "
        f"({', '.join(MODELS.names())}), a .gguf file, an HF folder or a hub id 'org/name'"
    )


def model_status() -> list[dict[str, str | bool]]:
    """One row per alias: name, parameters, kind, installed, cached, install hint (for `forgetless models`)."""
    rows = []
    for name, alias in MODELS.items():
        rows.append(
            {
                "name": name,
                "parameters": alias.parameters,
                "kind": alias.kind,
                "installed": alias.is_installed(),
                "cached": alias.is_cached(),
                "description": alias.description + (" (default)" if name == DEFAULT_MODEL else ""),
                "install": alias.install,
            }
        )
    return rows


__all__ = [
    "load_model",
    "model_status",
    "resolve_model_folder",
    "smollm2_tokenizer",
    "MissingDependencyError",
]
