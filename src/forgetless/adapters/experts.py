"""The LoRA experts' contribution, given each token's routing: step 5 of slim.py's docstring.

Two ways to compute the same sum ``sum_e w_e s_e B_e A_e x`` over stacked experts, a (E_l r, d_in)
and b (E_l r, d_out); ``MixtureLinear._sparse_pays`` picks one (benchmarks/expert_paths.py):

- ``dense_update``: every expert on every token as one rank-(E_l r) product, weighted per token;
- ``sparse_update``: each expert only on the tokens routed to it.

Grouped per-expert matmuls over a stacked layout are what MoE libraries do with custom kernels
(megablocks, vLLM's fused MoE); none runs on CPU or takes LoRA factors, so they are written here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forgetless.adapters.selection import taken_slots


def dense_update(
    inputs: Tensor, weights: Tensor, a: Tensor, b: Tensor, scales: Tensor, num_lora: int, rank: int
) -> Tensor:
    """All experts on all tokens. inputs: (T, d_in), weights: (T, E_l + E_id), scales: (E_l,)
    -> (T, d_out)."""
    # identity experts add nothing: their weight only takes share away from the LoRA experts
    lora_weights = weights[:, :num_lora] * scales
    hidden = inputs @ a.T  # (T, E_l r): every expert's A x in one product
    hidden = (hidden.view(-1, num_lora, rank) * lora_weights[:, :, None]).view(-1, num_lora * rank)
    return hidden @ b  # (T, d_out): the weighted sum of the experts' B (A x)


def sparse_update(
    inputs: Tensor,
    weights: Tensor,
    chosen: Tensor,
    a: Tensor,
    b: Tensor,
    scales: Tensor,
    num_lora: int,
    rank: int,
    dynamic: bool,
) -> Tensor:
    """Each LoRA expert only on the tokens routed to it (many tokens: training, prefill).

    The (token, slot) pairs are sorted by expert so that every expert reads one contiguous slice:
    one gather in, two matmuls per expert, one scatter-add out; K / E_l of the dense work.
    inputs: (T, d_in), weights: (T, E_l + E_id), chosen: (T, K); dynamic: top-p routing, whose
    slots after the cut carry weight 0 and are never run -> (T, d_out).
    """
    top_k, d_in, d_out = chosen.shape[1], a.shape[1], b.shape[1]
    flat = chosen.reshape(-1)
    if dynamic:  # slots after the top-p cut: sorted last, never run
        flat = flat.masked_fill(~taken_slots(weights, chosen).reshape(-1), weights.shape[1])
    order = torch.argsort(flat, stable=True)  # identity experts (indices >= E_l) sort last
    sizes = torch.bincount(flat, minlength=num_lora)[:num_lora].tolist()
    experts = [e for e in range(num_lora) if sizes[e]]
    update = inputs.new_zeros(inputs.shape[0], d_out)
    if not experts:  # every token chose identity experts only
        return update
    order = order[: sum(sizes)]
    token_of = torch.div(order, top_k, rounding_mode="floor")
    expert_of = flat[order]
    pair_weights = weights.gather(1, chosen).reshape(-1)[order] * scales[expert_of]
    gathered = inputs.index_select(0, token_of).split(sizes)
    a_experts = a.view(num_lora, rank, d_in)
    b_experts = b.view(num_lora, rank, d_out)
    hidden = torch.cat([gathered[e] @ a_experts[e].T for e in experts])
    hidden = (hidden * pair_weights[:, None]).split([sizes[e] for e in experts])
    outputs = torch.cat([part @ b_experts[e] for e, part in zip(experts, hidden)])
    return update.index_add_(0, token_of, outputs)
