"""``trained``: router rows trained on a small dataset with every expert frozen (Lee et al., 2024)."""

from __future__ import annotations

from torch import Tensor

from forgetless.errors import InputError
from forgetless.mixing.routers import ROUTERS, RouterContext
from forgetless.mixing.routers.hidden import hidden
from forgetless.mixing.routers.random import random


@ROUTERS.register("trained")
def trained(context: RouterContext) -> dict[str, Tensor]:
    """Start from the hidden router (random where experts have no prompts), then train the rows.

    The loop (``mixing.train.train_router``) minimises the language-model loss on the answer
    tokens of the experts' task examples; only the router weights receive updates.

    Returns:
        {point: (num_experts + num_identity, d_in)} float32, trained.
    """
    if context.train is None:
        raise InputError("router trained needs training data: give the experts a task")
    start = hidden(context) if context.prompts and all(context.prompts) else random(context)
    if context.total == 1:  # one expert takes every token: there is nothing to learn
        return start
    return context.train(start)
