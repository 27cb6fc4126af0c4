"""``lora_average``: average LoRA factors A and B separately (the paper's "LoRA merge")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from forgetless.merging.base import merge_method


@merge_method("lora_average", needs_base=False, per_model={"weight": 1.0}, inputs="lora_factors")
def lora_average(
    factors: Sequence[tuple[Tensor, Tensor, float]], *, weight: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """``A = sum_i w_i A_i / sum w``, ``B = sum_i w_i s_i B_i / sum w``; the result has scaling 1.

    This is the naive merge the paper compares against: ``B A`` of the result is *not* the average
    of the ``B_i A_i`` (cross terms ``B_i A_j`` appear); merge the dense deltas with ``average``
    for that. Each adapter's scaling ``s_i = alpha_i / r_i`` is folded into its ``B``.

    Args:
        factors: per adapter ``(A (r x d_in), B (d_out x r), scaling)``; all of the same rank ``r``.
        weight: one weight per adapter.

    Returns:
        ``(A (r x d_in), B (d_out x r))`` in float32, to be used with scaling 1.
    """
    if not factors:
        raise ValueError("lora_average needs at least one adapter")
    if len(weight) != len(factors):
        raise ValueError(f"weight has {len(weight)} values for {len(factors)} adapters")
    shape_a, shape_b = factors[0][0].shape, factors[0][1].shape
    for a, b, _ in factors:
        if a.shape != shape_a or b.shape != shape_b:
            raise ValueError(
                f"lora_average needs equal ranks and shapes: {tuple(a.shape)} vs {tuple(shape_a)}"
            )
    total = sum(weight)
    if abs(total) < 1e-12:
        raise ValueError("the weights sum to zero; lora_average divides by their sum")
    merged_a = torch.zeros(shape_a, dtype=torch.float32)
    merged_b = torch.zeros(shape_b, dtype=torch.float32)
    for (a, b, scaling), w in zip(factors, weight):
        merged_a.add_(a.float(), alpha=w)
        merged_b.add_(b.float(), alpha=w * scaling)
    return merged_a / total, merged_b / total
