"""Routers of an MoE mix: one file each, registered in ``ROUTERS``; each returns the gate rows.

A router sees, at every *router point* (the module whose input it routes: a decoder layer's MLP
for a Mixtral mix, each adapted linear layer for a LoRA-MoE), the token ``x`` and scores the
experts by ``W_g x``. A router here is a function ``RouterContext -> {point: W_g}`` with ``W_g``
of shape ``(num_experts + num_identity, d_in)``; identity experts (LoRA-MoE) come last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from forgetless.registry import Registry


@dataclass
class RouterContext:
    """What a router may use.

    Attributes:
        points: router point (module name) -> ``d_in`` of the tokens routed there.
        num_experts: experts with weights (FFT experts or LoRA experts), in config order.
        num_identity: identity experts after them (LoRA-MoE only).
        seed: seed of random initialisations.
        center: hidden router: subtract the experts' mean hidden state before normalising.
        prompts: per expert, token ids of prompts typical of it.
        negative_prompts: per expert, token ids of prompts it should not get.
        mean_inputs: token id lists -> {point: mean router input over their tokens (d_in,)}.
        train: trained router: initial rows -> trained rows (None when there is no data).
    """

    points: dict[str, int]
    num_experts: int
    num_identity: int
    seed: int
    center: bool
    prompts: list[list[list[int]]] = field(default_factory=list)
    negative_prompts: list[list[list[int]]] = field(default_factory=list)
    mean_inputs: Callable[[list[list[int]]], dict[str, Tensor]] | None = None
    train: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None

    @property
    def total(self) -> int:
        return self.num_experts + self.num_identity


Router = Callable[[RouterContext], dict[str, Tensor]]
ROUTERS: Registry[Router] = Registry("router", package="forgetless.mixing.routers")

__all__ = ["ROUTERS", "Router", "RouterContext"]
