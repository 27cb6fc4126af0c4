"""What a strategy's stage hooks see: ``StageContext`` (one stage) and ``TrainBatch`` (one micro-batch).

The runner (``forgetless.training.runner``) builds one ``StageContext`` per trained stage and calls,
in order::

    strategy.before_training(context)      model built, data encoded, nothing trained yet
    strategy.extra_loss(model, batch)      every micro-batch (batch: a TrainBatch)
    strategy.before_step(model, step)      every optimizer step, gradients complete, before clipping
    strategy.after_step(model, step)       every optimizer step, right after it (before a checkpoint)
    strategy.after_training(context)       training done, before the artifact and done.json

What a method needs to carry from one stage to the next (a Fisher diagonal, an episodic memory,
distillation targets) goes in the stage's **state folder** through ``context.save_state``: one
safetensors file and one JSON, written in one rename, next to the stage's artifact
(``stage-i-task/state/``). A later stage reads every earlier stage's with ``context.load_state``.
State is not part of the stage's model (``Strategy.load`` never reads it), so evaluation, merging
and export see only the artifact.

Resume: a stage killed mid-way restarts from its checkpoint, which holds the trainable tensors,
the persistent buffers and the tensors ``Strategy.checkpoint_tensors`` returns (what the strategy
updates mid-stage outside the model, such as slow weights); ``before_training`` runs again before
the checkpoint is read, so it must be a function of the built model and the data alone
(``context.resumed`` says when it runs before a resume). A stage found done runs no hook.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from forgetless.data.batching import collate
from forgetless.data.formatting import Encoded
from forgetless.data.task import Task
from forgetless.errors import InputError
from forgetless.io import atomic_dir, read_json, save_tensors, write_json

STATE_DIR = "state"
_TENSORS, _META = "state.safetensors", "state.json"


@dataclass
class TrainBatch:
    """One micro-batch as the loss saw it.

    Attributes:
        inputs: ``input_ids``, ``attention_mask`` and ``labels`` (B, T) as collated for the model.
        logits: (N, V) the trained model's logits at the N positions whose next token is labelled
            (row-major over ``keep``), still in the autograd graph: a distillation term needs no
            second forward.
        keep: (B, T) bool, the positions of ``logits``.
        indices: for each row, its index in ``StageContext.examples`` (a strategy that mixes
            sources tells the rows apart by it).

    N may be 0 (a micro-batch without answer tokens, or a process's no-loss stand-in under
    ``accelerate launch``).
    """

    inputs: dict[str, Tensor]
    logits: Tensor
    keep: Tensor
    indices: list[int] = field(default_factory=list)


@dataclass
class StageContext:
    """One stage being trained, as the strategy's ``before_training`` / ``after_training`` see it.

    Attributes:
        stage: 0-based index of the stage in the task sequence.
        tasks: the whole task sequence (``tasks[stage]`` is the one this stage adds).
        model: the model being trained (built by ``Strategy.build``).
        tokenizer: its tokenizer.
        examples: the stage's encoded training data (``Strategy.stage_data``, formatted).
        pad_id: the padding token id.
        seed: the training seed.
        folder: the stage folder (``stage-i-task/``), or None when training without one.
        previous: the stage folders of stages 0..stage-1 (their states, if any, are readable).
        resumed: True when a checkpoint will be restored after ``before_training``.
        main: whether this process writes files (False on the other ranks of ``accelerate launch``).
        trained_on: examples per source in the stage's data, recorded in done.json; a hook that
            adds training examples (``examples.append``) counts them here too.
        formatter: a ``PromptFormatter`` with the run's prompt style, system prompt (else the
            template's default) and max length: how examples a hook writes are encoded.

    In ``before_training`` the model is still where ``build`` put it: the loop moves it to the
    training device afterwards, so a hook that keeps tensors for later (a teacher, a memory)
    moves them to the device of the tensors it meets in ``extra_loss`` / ``before_step``.
    """

    stage: int
    tasks: Sequence[Task]
    model: nn.Module
    tokenizer: Any
    examples: list[Encoded]
    pad_id: int
    seed: int
    folder: Path | None = None
    previous: list[Path] = field(default_factory=list)
    resumed: bool = False
    main: bool = True
    trained_on: dict[str, int] = field(default_factory=dict)
    formatter: Any = None

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, Tensor]]:
        """The stage's examples in their order, collated (right padding), on the model's device;
        the first ``limit`` examples when given."""
        chosen = self.examples[:limit] if limit is not None else self.examples
        device = next(self.model.parameters()).device
        for start in range(0, len(chosen), batch_size):
            batch = collate(chosen[start : start + batch_size], self.pad_id)
            yield {key: value.to(device) for key, value in batch.items()}

    def save_state(self, tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> None:
        """Write this stage's state folder in one rename (main process only; replaces a partial one)."""
        if self.folder is None or not self.main:
            return
        with atomic_dir(self.folder / STATE_DIR, overwrite=True) as tmp:
            save_tensors(tmp / _TENSORS, {name: t.detach().cpu() for name, t in tensors.items()})
            write_json(tmp / _META, dict(meta or {}))

    def load_state(self, stage: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The state saved by earlier stage ``stage`` (tensors on the model's device, meta).

        Raises:
            InputError: that stage saved no state (it was trained by another strategy, or its
                folder was edited).
        """
        folder = self.previous[stage] / STATE_DIR
        if not (folder / _TENSORS).is_file():
            raise InputError(
                f"{folder} is missing: stage {stage} saved no strategy state; delete the run's later "
                "stage folders and train them again"
            )
        from safetensors.torch import load_file

        device = next(self.model.parameters()).device
        tensors = {name: tensor.to(device) for name, tensor in load_file(folder / _TENSORS).items()}
        return tensors, read_json(folder / _META)


def trainable_named(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of every trainable parameter (the tensors a regulariser may anchor)."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


@torch.no_grad()
def snapshot(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Detached copies of ``params`` (the anchor of a regulariser, a teacher's weights)."""
    return {name: param.detach().clone() for name, param in params.items()}
