"""``task_arithmetic``: add the weighted task vectors to the base (Ilharco et al., 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from forgetless.merging.base import check_inputs, each_input, merge_method, work_dtype


@merge_method("task_arithmetic", needs_base=True, per_model={"weight": 1.0})
def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = False,
) -> Tensor:
    """``base + lambda * sum_i w_i (theta_i - base)`` (divided by ``sum_i w_i`` when normalize).

    Args:
        base: base-model tensor, shape ``S``.
        tensors: fine-tuned tensors, shape ``S`` each.
        weight: one weight per model.
        lambda_: scale of the summed task vector.
        normalize: divide the weighted sum by the summed weights.

    Returns:
        merged tensor of shape ``S`` (float32, or float64 for float64 inputs).
    """
    check_inputs(tensors, {"weight": weight})
    dtype = work_dtype(base)
    base = base.to(dtype)
    merged = torch.zeros_like(base)
    for tensor, w in zip(each_input(tensors, base.shape, dtype), weight):
        merged.add_(tensor - base, alpha=w)
    if normalize and abs(sum(weight)) >= 1e-8:
        merged.div_(sum(weight))
    if lambda_ != 1:
        merged.mul_(lambda_)
    return base + merged
