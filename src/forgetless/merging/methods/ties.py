"""``ties``: TIES merging (Yadav et al., 2023): trim, elect sign, disjoint mean."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from forgetless.merging.base import (
    check_inputs,
    each_input,
    magnitude_trim_,
    merge_method,
    sign_consensus_merge,
    work_dtype,
)


@merge_method("ties", needs_base=True, per_model={"weight": 1.0, "density": 1.0})
def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = True,
) -> Tensor:
    """TIES: keep each task vector's top ``density`` share by magnitude, elect signs, average the agreeing.

    1. trim: ``d_i = topk_magnitude(theta_i - base, density_i)``;
    2. elect: ``s = sign(sum_i w_i d_i)`` (zero counts as +);
    3. disjoint mean: ``m = sum_i w_i d_i [sign(w_i d_i) = s] / sum_i w_i [sign(w_i d_i) = s]``;
    4. ``base + lambda * m``. Same semantics and defaults as mergekit's ``ties``.

    Args:
        base: base-model tensor, shape ``S``.
        tensors: fine-tuned tensors, shape ``S`` each.
        weight: one weight per model.
        density: share of each task vector kept (0 < density <= 1; the paper uses 0.2).
        lambda_: scale of the merged task vector.
        normalize: the disjoint mean (False: the sum of the agreeing entries).

    Returns:
        merged tensor of shape ``S`` (float32, or float64 for float64 inputs).
    """
    check_inputs(tensors, {"weight": weight, "density": density})
    dtype = work_dtype(base)
    base = base.to(dtype)
    # each input becomes its trimmed task vector right away (the delta is ours to trim in place)
    trimmed = [
        magnitude_trim_(tensor - base, d)
        for tensor, d in zip(each_input(tensors, base.shape, dtype), density)
    ]
    merged = sign_consensus_merge(trimmed, weight, normalize)
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(base)
