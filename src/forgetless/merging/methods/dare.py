"""``dare``: drop-and-rescale task vectors, then add them linearly (Yu et al., 2024; mergekit ``dare_linear``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from forgetless.merging.base import check_inputs, each_input, merge_method, random_drop_, work_dtype


@merge_method("dare", needs_base=True, per_model={"weight": 1.0, "density": 1.0})
def dare(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "inverse_density",
    seed: int = 0,
) -> Tensor:
    """DARE: ``base + lambda * sum_i w_i drop(theta_i - base)``, each entry kept with probability ``density_i``.

    Args:
        base: base-model tensor, shape ``S``.
        tensors: fine-tuned tensors, shape ``S`` each.
        weight: one weight per model.
        density: keep probability per model (the DARE paper's ``1 - p``).
        lambda_: scale of the summed task vector.
        normalize: divide the weighted sum by the summed weights.
        rescale: ``inverse_density`` (paper), ``l1`` (mergekit) or ``none``.
        seed: drop seed; model ``i`` uses stream ``i``, so the masks are reproducible.

    Returns:
        merged tensor of shape ``S`` (float32, or float64 for float64 inputs).
    """
    check_inputs(tensors, {"weight": weight, "density": density})
    dtype = work_dtype(base)
    base = base.to(dtype)
    merged = torch.zeros_like(base)
    for index, (tensor, w, d) in enumerate(zip(each_input(tensors, base.shape, dtype), weight, density)):
        merged.add_(random_drop_(tensor - base, d, seed, index, rescale), alpha=w)
    if normalize and abs(sum(weight)) >= 1e-8:
        merged.div_(sum(weight))
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(base)
