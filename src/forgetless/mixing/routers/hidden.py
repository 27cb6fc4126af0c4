"""``hidden``: training-free gate rows from mean hidden states of each expert's prompts (mergekit-moe)."""

from __future__ import annotations

import torch
from torch import Tensor

from forgetless.errors import InputError
from forgetless.mixing.routers import ROUTERS, RouterContext


@ROUTERS.register("hidden")
def hidden(context: RouterContext) -> dict[str, Tensor]:
    """Row ``e`` = normalised mean router input over expert ``e``'s prompts.

    ``m_e`` is the mean input of the router point over all tokens of the expert's prompts, minus
    the mean over its negative prompts (as mergekit-moe). With ``center`` the experts' average
    ``mean_e m_e`` is subtracted first: hidden states of different domains share a large common
    component, and without removing it every expert gets nearly the same logit. Rows are scaled
    to unit norm; identity experts get zero rows (logit 0, between the experts' +- logits).

    Returns:
        {point: (num_experts + num_identity, d_in)} float32.
    """
    if context.mean_inputs is None:
        raise InputError("router hidden needs the base model's hidden states; none were provided")
    means: list[dict[str, Tensor]] = []
    for index, prompts in enumerate(context.prompts):
        if not prompts:
            raise InputError(f"experts.{index}: router hidden needs prompts or a task for this expert")
        mean = context.mean_inputs(prompts)
        negatives = context.negative_prompts[index] if context.negative_prompts else []
        if negatives:
            negative = context.mean_inputs(negatives)
            mean = {point: mean[point] - negative[point] for point in mean}
        means.append(mean)
    rows = {}
    for point, dim in context.points.items():
        stacked = torch.stack([mean[point].float() for mean in means])  # (E, d)
        if context.center and stacked.shape[0] > 1:
            stacked = stacked - stacked.mean(dim=0, keepdim=True)
        stacked = stacked / stacked.norm(dim=1, keepdim=True).clamp(min=1e-8)
        identity = torch.zeros(context.num_identity, dim)
        rows[point] = torch.cat([stacked, identity])
    return rows
