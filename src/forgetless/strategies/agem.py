"""A-GEM: averaged gradient episodic memory (Chaudhry et al., ICLR 2019, "Efficient Lifelong
Learning with A-GEM").

**Method.** Each stage keeps a small episodic memory of its own task's training examples. From
stage 1 on, every optimizer step compares the step's gradient ``g`` (the trainable parameters,
flattened) with a reference gradient ``g_ref``: the gradient of the answer-token loss on a batch
drawn from the memories of all earlier stages. When the step would raise that loss to first order
(``g . g_ref < 0``), ``g`` is projected onto the half-space where it does not::

    g <- g - (g . g_ref / g_ref . g_ref) g_ref

otherwise ``g`` is left as it is. Weight decay, clipping and AdamW then act on the result.

**Memory.** ``memory_per_task`` examples of the stage's own task, drawn with a generator seeded by
(seed, stage), saved as padded tensors in the stage's state folder (each stage stores only its
own; stage i reads stages 0..i-1). ``memory_batch`` examples per step are drawn from their union
with a generator seeded by (seed, stage, step), so a resumed stage draws the same ones.

**Cost.** One extra forward and backward on ``memory_batch`` examples per optimizer step, from
stage 1 on (in eval mode, without the loop's mixed-precision autocast), plus two flat copies of
the trainable gradients. Needs old data, so only in the fully-cooperative setting.

``mode: lora`` is sequential LoRA (earlier adapters merged, a fresh one per stage) with the
projection on the current adapter's gradients; ``mode: fft`` continues all weights.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from forgetless.data.batching import collate
from forgetless.data.formatting import Encoded
from forgetless.strategies import ModeParams, Strategy, register_strategy
from forgetless.strategies._base import mode_engine
from forgetless.strategies._engines import Engine
from forgetless.strategies.context import StageContext, trainable_named
from forgetless.training.loss import answer_loss

_MIX = 1_000_003


class AGEMParams(ModeParams):
    memory_per_task: int = Field(16, ge=1, description="examples each stage keeps of its own task")
    memory_batch: int = Field(8, ge=1, description="memory examples per reference gradient")


def project(g: Tensor, g_ref: Tensor) -> Tensor:
    """A-GEM's rule on flat gradients: ``g`` minus its component along ``g_ref`` when they conflict.

    Returns ``g`` itself when ``g . g_ref >= 0`` (or ``g_ref`` is zero), else a new tensor
    ``g - (g . g_ref / g_ref . g_ref) g_ref``, whose dot product with ``g_ref`` is zero. Inputs
    are not modified.
    """
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    norm = torch.dot(g_ref, g_ref)
    if norm <= 0:
        return g
    return g - (dot / norm) * g_ref


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * _MIX + int(part)) % (2**63)
    return value


def _flatten(params: list[nn.Parameter], grads: list[Tensor | None]) -> Tensor:
    """One float32 vector of ``grads`` (zeros for a parameter without one)."""
    return torch.cat(
        [
            torch.zeros(p.numel(), device=p.device) if g is None else g.detach().reshape(-1).float()
            for p, g in zip(params, grads, strict=True)
        ]
    )


def memory_tensors(examples: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Padded ``input_ids`` and ``labels`` (K, T) and ``lengths`` (K,) of ``examples``."""
    batch = collate(examples, pad_id)
    lengths = torch.tensor([len(example) for example in examples], dtype=torch.long)
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "lengths": lengths}


def memory_examples(tensors: dict[str, Tensor]) -> list[Encoded]:
    """The ``Encoded`` examples that ``memory_tensors`` saved (padding cut off)."""
    ids, labels = tensors["input_ids"].cpu().tolist(), tensors["labels"].cpu().tolist()
    return [
        Encoded(input_ids=row[:n], labels=label_row[:n])
        for row, label_row, n in zip(ids, labels, tensors["lengths"].cpu().tolist(), strict=True)
    ]


@register_strategy("agem")
class AGEM(Strategy):
    """A-GEM; params: memory_per_task, memory_batch, mode (lora | fft), AdapterConfig fields."""

    setting_required = "fully_cooperative"
    Params = AGEMParams
    accepts_adapter_fields = True

    def __init__(self, params: dict[str, Any] | None = None, source: str = "params") -> None:
        super().__init__(params, source)
        self.memory: list[Encoded] = []
        self._stage, self._seed, self._pad_id = 0, 0, 0

    def make_engine(self) -> Engine:
        return mode_engine(self, lora="merge", fft="continue")

    # ---- memory --------------------------------------------------------------------------------

    def memory_indices(self, count: int, seed: int, stage: int) -> list[int]:
        """Which of the stage's ``count`` examples it keeps (seeded by seed and stage)."""
        generator = torch.Generator().manual_seed(_seed(seed, stage, 1))
        keep = min(self.params.memory_per_task, count)
        return torch.randperm(count, generator=generator)[:keep].tolist()

    def before_training(self, context: StageContext) -> None:
        self._stage, self._seed, self._pad_id = context.stage, context.seed, context.pad_id
        self.memory = []
        for stage in range(context.stage):
            tensors, _ = context.load_state(stage)
            self.memory.extend(memory_examples(tensors))

    def after_training(self, context: StageContext) -> None:
        # context.examples is this stage's own task only (A-GEM keeps the default stage_data)
        indices = self.memory_indices(len(context.examples), context.seed, context.stage)
        tensors = memory_tensors([context.examples[i] for i in indices], context.pad_id)
        tensors["indices"] = torch.tensor(indices, dtype=torch.long)
        meta = {"task": context.tasks[context.stage].name, "examples": len(indices)}
        context.save_state(tensors, meta)

    # ---- projection ----------------------------------------------------------------------------

    def memory_batch(self, step: int) -> list[Encoded]:
        """The memory examples of ``step``: drawn with a generator seeded by (seed, stage, step),
        never the global RNG, so a resumed stage (and every process) draws the same."""
        generator = torch.Generator().manual_seed(_seed(self._seed, self._stage, step, 2))
        order = torch.randperm(len(self.memory), generator=generator)[: self.params.memory_batch]
        return [self.memory[i] for i in order.tolist()]

    def reference_gradient(self, model: nn.Module, step: int) -> Tensor:
        """Flat float32 gradient of the answer loss on ``memory_batch(step)`` wrt the trainable
        parameters (zeros where a parameter gets none). Computed in eval mode with
        ``torch.autograd.grad``: no ``.grad`` is touched and no DDP hook fires; the modules'
        train/eval flags are restored afterwards."""
        params = list(trainable_named(model).values())
        device = params[0].device
        batch = collate(self.memory_batch(step), self._pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with torch.enable_grad():
                loss = answer_loss(model, batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for module, training in modes.items():
                module.training = training
        return _flatten(params, grads)

    def before_step(self, model: nn.Module, step: int) -> None:
        """Project the step's gradient when it conflicts with the memory's (from stage 1 on).

        Under ``accelerate launch`` the gradients here are already averaged over processes, and
        every process draws the same memory batch (its seed has no rank) on identical weights, so
        all compute the same ``g_ref`` and the same projection: they stay in step without any
        communication. With fp16 the gradients are still loss-scaled; the rule is unchanged by a
        positive scale (and a non-finite gradient stays non-finite, so the scaler skips the step).
        """
        if not self.memory:
            return
        params = list(trainable_named(model).values())
        if not params:
            return
        g = _flatten(params, [param.grad for param in params])
        projected = project(g, self.reference_gradient(model, step))
        if projected is g:
            return
        offset = 0
        for param in params:
            piece = projected[offset : offset + param.numel()].view_as(param)
            offset += param.numel()
            if param.grad is None:
                param.grad = piece.to(param.dtype).clone()
            else:
                param.grad.copy_(piece)
