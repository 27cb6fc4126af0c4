"""A set of routed LoRA experts as one plain LoRA: what a GPU engine can serve.

A mixture layer (slim.py) adds, per token ``x``,

    sum_{e LoRA} w_e(x) s_e B'_e A'_e x          (w_e(x): softmax over the token's top-K, identity
                                                 experts included; A', B', s: after dynamic merging)

With fixed weights ``w_e`` this is one LoRA of rank ``E_l r``: stack the ``A'_e`` as its A and the
``w_e s_e B'_e`` side by side as its B; that step is exact. What is approximated is the routing:
``w_e(x)`` depends on the token, the exported LoRA uses its mean over calibration tokens
(``calibration.py``). Tokens routed partly to identity experts lower every ``w_e``, so the
identity share of the mixture lowers the LoRA's share too. One LoRA expert and no identity expert
give ``w = 1`` on every token: then the export is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forgetless.export.layout import Layout

#: module name -> (A (R, d_in), B (d_out, R), scaling): what ``write_peft_lora`` writes
Factors = dict[str, tuple[Tensor, Tensor, float]]


def concatenate_experts(a: Tensor, b: Tensor, scales: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """One LoRA with ``B A = sum_e weights_e scales_e B_e A_e`` (the scaling folded into B).

    Args:
        a: (E r, d_in) the experts' A stacked, b: (E r, d_out) their B transposed and stacked
            (as ``MixtureLinear.expert_factors`` gives them), scales: (E,), weights: (E,).

    Returns:
        A (E r, d_in) and B (d_out, E r); PEFT's scaling for them is 1 (``lora_alpha = r``).
    """
    rank = a.shape[0] // scales.shape[0]
    per_row = (weights.to(b.dtype) * scales.to(b.dtype)).repeat_interleave(rank)
    return a.detach().clone(), (b.detach() * per_row[:, None]).T.contiguous()


@torch.no_grad()
def adapter_factors(layout: Layout, weights: dict[str, dict[str, Tensor]]) -> dict[str, Factors]:
    """The PEFT factors of every exported adapter.

    Args:
        weights: adapter name -> module name -> (E_l,) mean routing weights of its LoRA experts
            (``calibration.mean_routing_weights``); exact adapters need none (their weight is 1).

    Returns:
        adapter name -> module name -> (A, B, scaling).
    """
    factors: dict[str, Factors] = {}
    for adapter in layout.adapters:
        factors[adapter.name] = {}
        for module, layer in layout.layers.items():
            if layout.kind == "lora":
                factors[adapter.name][module] = (
                    layer.lora_A.detach().clone(),
                    layer.lora_B.detach().clone(),
                    float(layer.scaling),
                )
                continue
            current = adapter.stage is None or adapter.stage == len(layer.earlier_experts)
            a, b, scales = layer.expert_factors(None if current else layer.earlier_experts[adapter.stage])
            mean = torch.ones_like(scales) if adapter.exact else weights[adapter.name][module]
            big_a, big_b = concatenate_experts(a, b, scales, mean)
            factors[adapter.name][module] = (big_a, big_b, 1.0)
    return factors
