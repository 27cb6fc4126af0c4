"""The forgetless cache folder and GGUF -> safetensors conversion.

transformers can read a GGUF file directly, but it dequantizes every tensor on every load (about
20 s for the 135M default model on 2 CPU cores). We convert once to an fp32 safetensors HF folder
under ``$FORGETLESS_HOME/models/`` (default ``~/.cache/forgetless``), written atomically, so later
loads take a second or two and the folder is a plain HF model that any tool (PEFT, lm-eval, vLLM)
can read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from forgetless.errors import InputError
from forgetless.io import atomic_dir, write_json


def forgetless_home() -> Path:
    """``$FORGETLESS_HOME`` or ``~/.cache/forgetless``."""
    return Path(os.environ.get("FORGETLESS_HOME", Path.home() / ".cache" / "forgetless")).expanduser()


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Cache folder for one GGUF file, keyed by its name, size and modification time."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return forgetless_home() / "models" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Dequantize ``gguf_path`` to an fp32 safetensors HF folder (model + tokenizer); reuse if present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out_dir) if out_dir is not None else gguf_cache_dir(gguf_path)
    if (out / "config.json").exists():
        return out
    with gguf_path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise InputError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks the model "quantized with gguf" (and refuses to save it), but the weights
    # it holds are already dequantized fp32: drop the marker so the folder is a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "forgetless_source.json", {"gguf": str(gguf_path.resolve())})
    return out
