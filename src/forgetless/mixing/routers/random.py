"""``random``: seeded Gaussian gate rows (a baseline; mergekit-moe's ``random`` mode)."""

from __future__ import annotations

import torch
from torch import Tensor

from forgetless.mixing.routers import ROUTERS, RouterContext


@ROUTERS.register("random")
def random(context: RouterContext) -> dict[str, Tensor]:
    """Rows ``~ N(0, 1/d_in)`` per point, so logits of unit-RMS tokens are about ``N(0, 1)``.

    Points are drawn in sorted order from one generator: the same seed gives the same router.

    Returns:
        {point: (num_experts + num_identity, d_in)} float32.
    """
    generator = torch.Generator().manual_seed(context.seed)
    return {
        point: torch.randn(context.total, context.points[point], generator=generator)
        / context.points[point] ** 0.5
        for point in sorted(context.points)
    }
