"""``dare_ties``: DARE's random drop in place of TIES' magnitude trim (the paper's "TIES-DARE")."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from forgetless.merging.base import (
    check_inputs,
    each_input,
    merge_method,
    random_drop_,
    sign_consensus_merge,
    work_dtype,
)


@merge_method("dare_ties", needs_base=True, per_model={"weight": 1.0, "density": 1.0})
def dare_ties(
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
    """Drop-and-rescale each task vector, then TIES' sign election and (normalize) disjoint mean.

    Defaults follow mergekit's ``dare_ties`` (normalize off) except the rescale, which follows the
    DARE paper (``1 / density``; set ``rescale: l1`` for mergekit's).

    Args:
        base: base-model tensor, shape ``S``.
        tensors: fine-tuned tensors, shape ``S`` each.
        weight: one weight per model.
        density: keep probability per model.
        lambda_: scale of the merged task vector.
        normalize: divide by the summed weights of the agreeing entries.
        rescale: ``inverse_density``, ``l1`` or ``none``.
        seed: drop seed (model ``i`` uses stream ``i``).

    Returns:
        merged tensor of shape ``S`` (float32, or float64 for float64 inputs).
    """
    check_inputs(tensors, {"weight": weight, "density": density})
    dtype = work_dtype(base)
    base = base.to(dtype)
    inputs = each_input(tensors, base.shape, dtype)
    dropped = [
        random_drop_(tensor - base, d, seed, index, rescale)
        for index, (tensor, d) in enumerate(zip(inputs, density))
    ]
    merged = sign_consensus_merge(dropped, weight, normalize)
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(base)
