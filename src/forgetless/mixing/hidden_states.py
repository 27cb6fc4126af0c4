"""Mean router inputs: the average input of given modules over all tokens of some prompts."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mean_module_inputs(
    model: nn.Module, points: list[str], prompts: list[list[int]], pad_id: int, batch_size: int = 8
) -> dict[str, Tensor]:
    """Average input vector of each module in ``points`` over every (non-pad) token of ``prompts``.

    Args:
        model: a causal LM (the base model; frozen, run without gradients).
        points: module names whose first positional input is captured (``model.layers.3.mlp``).
        prompts: token id lists.
        pad_id: id used to pad a batch (masked out of the average and of attention).

    Returns:
        {point: (d_in,) float32 mean}.
    """
    modules = dict(model.named_modules())
    missing = [point for point in points if point not in modules]
    if missing:
        raise ValueError(f"the model has no module {missing[0]}")
    sums: dict[str, Tensor] = {}
    count = 0
    mask: Tensor | None = None

    def capture(point: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            weights = mask.reshape(*mask.shape, 1).to(torch.float64)
            total = (x.detach().to(torch.float64) * weights).sum(dim=(0, 1))
            sums[point] = sums[point] + total if point in sums else total

        return hook

    handles = [modules[point].register_forward_pre_hook(capture(point), with_kwargs=True) for point in points]
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                longest = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                for row, ids in enumerate(batch):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    mask[row, : len(ids)] = 1
                # the decoder alone: the router points are inside it, the vocabulary projection is not needed
                getattr(model, "model", model)(input_ids=input_ids, attention_mask=mask)
                count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {point: (sums[point] / max(count, 1)).float() for point in points}


__all__ = ["mean_module_inputs"]
