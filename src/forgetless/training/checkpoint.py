"""Resumable mid-stage checkpoints: trained tensors, optimizer, schedule position, loss history.

A checkpoint is one folder written atomically (``io.atomic_dir``), so a run killed while writing
keeps the previous checkpoint whole:

    checkpoint/
      tensors.safetensors   every trainable parameter and every persistent buffer (adapter
                            statistics such as SLIM's cluster centres), by state-dict name
      strategy.safetensors  tensors the strategy updates during a stage outside the model
                            (``Strategy.checkpoint_tensors``, e.g. I-LoRA's slow weights), if any
      optimizer.pt          AdamW state (read back with torch.load(weights_only=True): no pickle)
      state.json            step (= data position and schedule position), loss history, token
                            counts, elapsed seconds, settings fingerprint, grad-scaler state

The learning rate is a pure function of the step and the data order a pure function of
(seed, epoch), so the step number restores both. Randomness inside a step (dropout) is re-seeded
from (seed, step, process) at the start of every step, so there is no RNG stream to carry over:
a resumed run draws exactly the numbers an uninterrupted run draws.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from forgetless.errors import InputError
from forgetless.io import atomic_dir, save_tensors

CHECKPOINT_DIR = "checkpoint"


@dataclass
class LoopState:
    """Where a stage's training stands after ``step`` optimizer steps."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    extra_losses: list[float] = field(default_factory=list)
    tokens: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0
    fingerprint: str = ""
    scaler: dict[str, Any] | None = None


def tracked_names(model: nn.Module) -> set[str]:
    """State-dict names of the tensors that training changes: trainable parameters, persistent buffers."""
    names = {name for name, param in model.named_parameters(remove_duplicate=False) if param.requires_grad}
    state_keys = set(model.state_dict(keep_vars=True))
    names |= {name for name, _ in model.named_buffers(remove_duplicate=False) if name in state_keys}
    return names


def tracked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor for ``tracked_names(model)`` (views of the live tensors)."""
    wanted = tracked_names(model)
    return {name: tensor for name, tensor in model.state_dict().items() if name in wanted}


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``folder/checkpoint`` in one rename (replacing the previous one only when complete);
    ``extra``: the strategy's own tensors (``Strategy.checkpoint_tensors``)."""
    with atomic_dir(folder / CHECKPOINT_DIR, overwrite=True) as tmp:
        save_tensors(tmp / "tensors.safetensors", tracked_state(model))
        if extra:
            save_tensors(tmp / "strategy.safetensors", {k: t.detach() for k, t in extra.items()})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)) + "\n", encoding="utf-8")


def has_checkpoint(folder: Path | None) -> bool:
    return folder is not None and (folder / CHECKPOINT_DIR / "state.json").is_file()


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
    extra: dict[str, torch.Tensor] | None = None,
) -> LoopState:
    """Restore ``model``'s tracked tensors, ``optimizer`` and the live ``extra`` tensors in place;
    return the loop state.

    Raises:
        InputError: the checkpoint was written with other settings (different fingerprint) or does
            not fit the model (a different strategy or adapter).
    """
    path = folder / CHECKPOINT_DIR
    try:
        state = LoopState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise InputError(
            f"{path}/state.json is unreadable ({error}); delete {path} to restart the stage"
        ) from None
    if fingerprint and state.fingerprint != fingerprint:
        raise InputError(
            f"{path} was written with other settings (data, strategy or training config changed); "
            f"delete {folder} to train the stage again, or choose another output folder"
        )
    tensors = load_file(path / "tensors.safetensors")
    wanted = tracked_names(model)
    if set(tensors) != wanted:
        missing = sorted(wanted - set(tensors))[:3]
        extra = sorted(set(tensors) - wanted)[:3]
        raise InputError(
            f"{path} does not fit this model (missing {missing}, unexpected {extra}); "
            f"delete {folder} to train the stage again"
        )
    model.load_state_dict(tensors, strict=False)
    if extra:
        _restore_extra(path, extra, folder)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    return state


def _restore_extra(path: Path, extra: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy the checkpoint's strategy tensors into the strategy's live ones (same names and shapes)."""
    file = path / "strategy.safetensors"
    saved = load_file(file) if file.is_file() else {}
    if set(saved) != set(extra) or any(saved[k].shape != extra[k].shape for k in extra):
        raise InputError(
            f"{path} does not fit this strategy's state (its strategy tensors differ); "
            f"delete {folder} to train the stage again"
        )
    with torch.no_grad():
        for name, tensor in extra.items():
            tensor.copy_(saved[name])
