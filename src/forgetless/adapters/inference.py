"""The SLIM layer at inference, folded into as few tensor operations as possible.

Generation runs one token at a time, so the cost of a mixture layer is the number of operator
calls, not their arithmetic. With the weights frozen, SLIM's equations (steps 1-6 of slim.py's docstring) fold:

- one ``addmm`` gives the router logits, the clustering's cross term ``x (-2 mu / var)^T`` plus
  ``sum mu^2 / var``, and the constant part of the yielding shift (``gamma * offset`` on the
  identity columns);
- a second ``addmm`` adds ``x^2 (1 / var)^T``: the standardised distances to every centre;
- the calibrated distance's slope times ``gamma`` lands on the identity logits in one ``addcmul``;
- the masked, rescaled experts (dynamic merging) are precomputed once;
- one token (batch-1 decoding) runs only the LoRA experts it chose: their rows of the stacked
  factors are gathered, instead of all experts' product with zero weights for the others (at
  SLIM's top-2 of 8 a quarter of the arithmetic; the memory reads are what a decoding step
  costs on CPU, ``benchmarks/adapters.py``).

``MixtureLinear`` uses this path in eval mode without autograd; the numbers equal its general
path up to float rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forgetless.adapters.selection import select_experts


@dataclass(frozen=True)
class InferencePlan:
    """Frozen tensors of one layer. ``weight_t`` (d_in, E_tot [+ N_c]), ``bias`` (E_tot [+ N_c]),
    ``a_t`` (d_in, E_l r), ``b`` (E_l r, d_out), ``scales`` (E_l,), ``inverse_t`` (d_in, N_c) or
    None, ``yield_columns`` (E_tot,) or None, ``a`` (E_l r, d_in): ``a_t`` row-major per expert
    (the rows one token's chosen experts gather)."""

    weight_t: Tensor
    bias: Tensor
    a_t: Tensor
    b: Tensor
    scales: Tensor
    inverse_t: Tensor | None
    yield_columns: Tensor | None
    a: Tensor


def build_plan(layer: torch.nn.Module, experts: torch.nn.Module | None = None) -> InferencePlan:
    """Fold ``layer`` (a ``MixtureLinear``) for inference, with an earlier stage's frozen
    ``experts`` (``StageExperts``) in place of its own if given; call under ``torch.no_grad()``."""
    config = layer.config
    a, b, scales = layer.expert_factors(experts)
    router = (layer if experts is None else experts).router.detach()
    num_total = config.num_total_experts
    if layer.config.uses_sample_gate:  # the yielding signal comes per sequence from the gate
        return InferencePlan(
            router.T.contiguous(),
            router.new_zeros(num_total),
            a.T.contiguous(),
            b,
            scales,
            None,
            layer.identity_columns * config.yield_scale,
            a.contiguous(),
        )
    if layer.clusters is None:
        return InferencePlan(
            router.T.contiguous(),
            router.new_zeros(num_total),
            a.T.contiguous(),
            b,
            scales,
            None,
            None,
            a.contiguous(),
        )
    constants = layer.clusters.constants()
    gamma = config.yield_scale
    identity = layer.identity_columns
    weight = torch.cat([router, constants.cross.to(router.dtype)])
    # Eq. 4 with d = r * scale + offset: gamma * offset is a constant on the identity logits
    bias = torch.cat([identity * (gamma * constants.calibration_offset), constants.offset.to(router.dtype)])
    return InferencePlan(
        weight_t=weight.T.contiguous(),
        bias=bias,
        a_t=a.T.contiguous(),
        b=b,
        scales=scales,
        inverse_t=constants.inverse.T.contiguous().to(router.dtype),
        yield_columns=identity * (gamma * constants.calibration_scale),
        a=a.contiguous(),
    )


def inference_update(
    layer: torch.nn.Module,
    plan: InferencePlan,
    tokens: Tensor,
    signal: Tensor | None = None,
    routing: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The adapter's contribution ``sum_e w_e s_e B'_e A'_e x``. tokens: (T, d_in) -> (T, d_out);
    signal: (T,) the sample-level gate's score of each token's sequence, or None. With
    ``routing`` also the routing weights (T, E_tot) and chosen experts (T, K)."""
    config = layer.config
    num_total, num_lora, rank = config.num_total_experts, config.num_experts, config.r
    both = torch.addmm(plan.bias, tokens, plan.weight_t)
    logits = both[:, :num_total]
    if plan.inverse_t is not None:
        scores = torch.addmm(both[:, num_total:], tokens * tokens, plan.inverse_t)
        raw = layer.clusters.raw_distance(tokens, scores.argmin(dim=1))
        logits = torch.addcmul(logits, raw.unsqueeze(1), plan.yield_columns)
    elif signal is not None:
        logits = torch.addcmul(logits, signal.unsqueeze(1), plan.yield_columns)
    weights, chosen = select_experts(logits, config.top_k, config.top_p)
    if tokens.shape[0] == 1 and chosen.shape[1] < num_lora:
        update = _chosen_experts_update(plan, tokens, weights, chosen, num_lora, rank)
    else:
        lora_weights = weights[:, :num_lora] * plan.scales
        hidden = (tokens @ plan.a_t).view(-1, num_lora, rank) * lora_weights.unsqueeze(2)
        update = hidden.view(-1, num_lora * rank) @ plan.b
    return (update, weights, chosen) if routing else update


def _chosen_experts_update(
    plan: InferencePlan, token: Tensor, weights: Tensor, chosen: Tensor, num_lora: int, rank: int
) -> Tensor:
    """One token's update from the LoRA experts it chose only (identity experts and slots of
    weight 0 add nothing): token (1, d_in) -> (1, d_out)."""
    picked = chosen[0][chosen[0] < num_lora]
    if not picked.numel():
        return token.new_zeros(1, plan.b.shape[1])
    a = plan.a.view(num_lora, rank, -1).index_select(0, picked).view(-1, plan.a.shape[1])
    b = plan.b.view(num_lora, rank, -1).index_select(0, picked).view(-1, plan.b.shape[1])
    scale = (weights[0].index_select(0, picked) * plan.scales.index_select(0, picked)).repeat_interleave(rank)
    return ((token @ a.T) * scale) @ b
