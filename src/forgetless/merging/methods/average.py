"""``average``: the weighted mean of the models' weights (mergekit ``linear``, the paper's "FFT merge")."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from forgetless.merging.base import check_inputs, each_input, merge_method, work_dtype


@merge_method("average", needs_base=False, per_model={"weight": 1.0})
def average(
    base: Tensor | None, tensors: Sequence[Tensor], *, weight: Sequence[float], normalize: bool = True
) -> Tensor:
    """Weighted average: ``sum_i w_i theta_i / sum_i w_i`` (a weighted sum when normalize is False).

    Args:
        base: unused (averaging needs no base); accepted so every method has one call form.
        tensors: one tensor per model, shape ``S``.
        weight: one weight per model.
        normalize: divide by ``sum_i w_i``.

    Returns:
        float32 (float64 for float64 inputs) tensor of shape ``S``.
    """
    check_inputs(tensors, {"weight": weight})
    dtype = work_dtype(tensors[0]) if base is None else work_dtype(base)
    merged: Tensor | None = None
    for tensor, w in zip(each_input(tensors, None if base is None else base.shape, dtype), weight):
        if merged is None:  # w * t equals 0 + w * t bit for bit, without a pass over zeros
            merged = tensor * w
        else:
            if tensor.shape != merged.shape:
                raise ValueError(f"shape mismatch: {tuple(tensor.shape)} vs {tuple(merged.shape)}")
            merged.add_(tensor, alpha=w)
        del tensor
    assert merged is not None
    if normalize:
        total = sum(weight)
        if abs(total) < 1e-12:
            raise ValueError("the weights sum to zero; average divides by their sum (set normalize: false)")
        merged.div_(total)
    return merged
