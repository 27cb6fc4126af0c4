"""Prompt-level weight yielding: the running mean of ``d(x)`` over a sequence, z-scored.

Why it exists (docs/results.md, "Routing"): on SmolLM2-135M after protocol A, a token's own
distance ``d(x)`` does not tell general prompts from in-domain ones (token AUC 0.49, averaged over
the adapted layers), so token-level yielding routed both alike. The mean of ``d`` over a prompt's
own tokens does (AUC 0.999), once the chat template's fixed prefix is left out: it is identical for
every prompt and outweighs the content of short prompts. No library implements this; it is our
extension of SLIM's Eq. 4, opt-in through ``AdapterConfig.yield_pooling = "prompt"``.

At position ``t`` of a row the signal is ``z_t = (mean_{s <= t, s content} d_s - mu) / sigma``,
where content tokens are the real (unpadded) tokens after the first ``yield_skip``, and ``mu``,
``sigma`` are running statistics of the per-sequence means of the training batches (learned in
train mode, frozen in eval mode). The mean is causal, so one forward over a whole sequence and a
prefill followed by token-by-token decoding with a KV cache give the same signal: the layer keeps
per-row running sums between the forwards of one sequence. Code that reorders or drops the rows of
a KV cache must reorder this state too (``reorder_sequence_state``); the evaluation loops do.

A forward without past tokens (its attention mask no longer than its input), or without an
attention mask, starts new sequences: decoding with a KV cache must pass the full mask, as
``generate`` and our loops do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from forgetless.adapters.base import TokenContext
from forgetless.adapters.gate import RunningMoments


class PromptPool(RunningMoments):
    """Running per-row mean of the calibrated distance, z-scored against training sequences.

    Buffers (saved with the adapter): ``sequence_mean``, ``sequence_square`` (running first and
    second moments of the training sequences' mean distance), ``batches`` (training batches seen;
    the running average is exact for the first ``1 / (1 - momentum)`` batches, an EMA after).
    """

    def __init__(self, skip: int, momentum: float) -> None:
        super().__init__(momentum)
        self.skip = skip
        # per row of the current sequences: real tokens seen, sum and count of content distances
        self.state: tuple[Tensor, Tensor, Tensor] | None = None

    def reorder(self, index: Tensor) -> None:
        """Keep/repeat rows as a KV cache's ``reorder_cache(index)`` does."""
        if self.state is not None:
            self.state = tuple(part.index_select(0, index.to(part.device)) for part in self.state)

    @staticmethod
    def _rows(leading: torch.Size, context: TokenContext) -> tuple[Tensor, int]:
        """(B, L) real-token mask of this forward's tokens, and how many past positions precede them."""
        if len(leading) > 2:
            raise ValueError(f"prompt pooling needs (batch, seq) inputs, got leading shape {tuple(leading)}")
        batch, length = (1, leading[0]) if len(leading) == 1 else (leading[0], leading[1])
        mask = context.attention_mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            return torch.ones(batch, length, dtype=torch.bool), 0
        past = mask.shape[1] - length
        return mask[:, past:].bool(), past

    @torch.no_grad()
    def forward(self, distance: Tensor, leading: torch.Size, context: TokenContext, learn: bool) -> Tensor:
        """(T,) calibrated distances of this forward's tokens -> (T,) pooled, z-scored signal."""
        real, past = self._rows(leading, context)
        batch, length = real.shape
        real = real.to(distance.device)
        d = distance.float().view(batch, length)
        if past == 0 or self.state is None:
            if past > 0:
                raise RuntimeError(
                    "prompt pooling: a forward continues a KV cache, but this layer holds no running "
                    "state (the prefill ran elsewhere); run the prompt through the same model first"
                )
            zeros = d.new_zeros(batch)
            seen, total, count = zeros, zeros, zeros
        else:
            seen, total, count = self.state
            if seen.shape[0] != batch:
                raise RuntimeError(
                    f"prompt pooling: {seen.shape[0]} running rows but a batch of {batch}; after "
                    "cache.reorder_cache(index) call forgetless.adapters.reorder_sequence_state(model, index)"
                )
        realf = real.float()
        rank = seen[:, None] + realf.cumsum(1)  # 1-based rank of each token among its row's real tokens
        content = (real & (rank > self.skip)).float()
        totals = total[:, None] + (d * content).cumsum(1)
        counts = count[:, None] + content.cumsum(1)
        means = totals / counts.clamp_min(1)
        self.state = (rank[:, -1].clone(), totals[:, -1].clone(), counts[:, -1].clone())
        if learn:
            finished = means[:, -1][counts[:, -1] > 0]
            self.update(finished)
        z = self.standardise(means)
        return torch.where(counts > 0, z, torch.zeros_like(z)).reshape(-1).to(distance.dtype)


def reorder_sequence_state(model: nn.Module, index: Tensor) -> None:
    """Reorder the per-sequence state of ``model`` as ``cache.reorder_cache(index)`` reorders a KV
    cache (drop finished rows, repeat a prompt's row per choice): the running rows of every
    prompt-pooling layer and the scores of the sample-level gate (gate.py). A no-op for models
    without either."""
    from forgetless.adapters.gate import _contexts

    for module in model.modules():
        if isinstance(module, PromptPool):
            module.reorder(index)
    for context in _contexts(model):
        if context.gate is not None:
            context.gate.reorder(index)


def _gates(model: nn.Module) -> list:
    """The sample-level gates (``SequenceGate``) of ``model``'s token contexts."""
    from forgetless.adapters.gate import _contexts

    return [context.gate for context in _contexts(model) if context.gate is not None]


def gate_state(model: nn.Module) -> list[tuple[Tensor | None, Tensor | None]]:
    """The sample-level gate's per-sequence state of ``model``: (scores, stages) of each gate."""
    return [(gate.scores, gate.stages) for gate in _gates(model)]


def set_gate_state(model: nn.Module, state: list[tuple[Tensor | None, Tensor | None]]) -> None:
    """Put a ``gate_state`` back (after a forward of other rows, or joined by ``joined_gate_state``)."""
    for gate, (scores, stages) in zip(_gates(model), state, strict=True):
        gate.scores, gate.stages = scores, stages


def joined_gate_state(
    first: list[tuple[Tensor | None, Tensor | None]], second: list[tuple[Tensor | None, Tensor | None]]
) -> list[tuple[Tensor | None, Tensor | None]]:
    """``first``'s rows followed by ``second``'s (``gate_state`` of two batches of one model), as
    two KV caches joined along the batch are."""
    return [(_joined(s, t), _joined(u, v)) for (s, u), (t, v) in zip(first, second, strict=True)]


def _joined(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    if first is None and second is None:
        return None
    if first is None or second is None:
        raise RuntimeError(
            "joining sequences whose gate state differs in kind; prefill both with the same model"
        )
    return torch.cat([first, second.to(first.device)])


def uses_sequence_state(model: nn.Module) -> bool:
    """Whether ``model`` has prompt-pooling layers (whose signal depends on the earlier tokens of a
    row: packed multi-sequence rows would mix them)."""
    return any(isinstance(module, PromptPool) for module in model.modules())
