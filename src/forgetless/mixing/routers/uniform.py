"""``uniform``: zero gate rows, so every expert gets the same weight 1/K (with top_k = all experts)."""

from __future__ import annotations

import torch
from torch import Tensor

from forgetless.mixing.routers import ROUTERS, RouterContext


@ROUTERS.register("uniform")
def uniform(context: RouterContext) -> dict[str, Tensor]:
    """All-zero rows: equal logits, so the softmax over the K chosen experts gives each 1/K.

    Returns:
        {point: zeros (num_experts + num_identity, d_in)}.
    """
    return {point: torch.zeros(context.total, dim) for point, dim in context.points.items()}
