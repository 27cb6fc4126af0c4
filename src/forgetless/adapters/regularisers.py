"""The auxiliary losses of routed LoRA mixtures (steps 7-8 of slim.py's docstring, and LoRAMoE's).

Pure functions of a layer's tensors, called by ``MixtureLinear`` and summed into the training loss
by ``adapter_regularization`` (inject.py):

- ``l1_penalty``: the SLIM paper's L1 penalty on the experts' A and B;
- ``load_balance``: the Switch / MixLoRA load-balancing loss over the LoRA experts
  (``balance_form: load``);
- ``localized_balance``: LoRAMoE's localized balancing constraint (``balance_form: localized``).

No library implements these on a stacked (E, r, d) expert layout, so they are written here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forgetless.adapters.selection import taken_slots


def l1_penalty(lora_a: Tensor, lora_b: Tensor) -> Tensor:
    """``|B|_1 / (r d_out) + |A|_1 / (r d_in)`` for A (E, r, d_in) and B (E, d_out, r)."""
    rank, d_in, d_out = lora_a.shape[1], lora_a.shape[2], lora_b.shape[1]
    return lora_b.abs().sum() / (rank * d_out) + lora_a.abs().sum() / (rank * d_in)


def load_balance(
    logits: Tensor,
    weights: Tensor,
    chosen: Tensor,
    token_mask: Tensor | None,
    num_lora: int,
    dynamic: bool,
) -> Tensor:
    """``E_l sum_e f_e P_e`` over LoRA experts (Switch / MixLoRA): f_e = share of LoRA slots given
    to e, P_e = mean router probability of e; 1 when perfectly balanced.

    Args:
        logits, weights: (T, E) router logits and routing weights; chosen: (T, K) expert indices;
        token_mask: (T,) bool real tokens or None; num_lora: E_l (LoRA experts come first);
        dynamic: top-p routing, where only the slots the cut kept count.
    """
    if token_mask is not None:
        logits, weights, chosen = logits[token_mask], weights[token_mask], chosen[token_mask]
    probabilities = torch.softmax(logits[:, :num_lora].float(), dim=1).mean(dim=0)
    lora = chosen < num_lora
    if dynamic:
        lora = lora & taken_slots(weights, chosen)
    counts = torch.bincount(chosen[lora], minlength=num_lora).float()
    share = counts / counts.sum().clamp_min(1.0)
    return num_lora * (share * probabilities).sum()


def localized_balance(
    weights: Tensor, token_mask: Tensor | None, rows: int, num_lora: int, delta: float
) -> Tensor:
    """LoRAMoE's localized balancing constraint (Dou et al. 2024, Sec. 3.2): ``CV(I * Q)^2``.

    Q (E_l x B) is each expert's importance for each sequence (the sum of its routing weights
    over the sequence's real tokens); I is 1 + delta where the expert's group matches the
    sample's type and 1 - delta elsewhere; the loss is the squared coefficient of variation
    (variance over squared mean, unbiased variance as in the authors' code) of all entries of
    I * Q. The LoRA experts are split in two halves, the first for world knowledge and the
    second for the downstream task, as in the authors' code; every training sample of a stage is
    new-task data (a stage has no world-knowledge data to tell apart), so every sample takes the
    second half's type.

    Note what the published definition does: the loss is 0 when every entry of I * Q is equal,
    that is where the matching half's importance is (1 - delta) / (1 + delta) of the other's.
    We keep the definition as published (paper and code agree) so that our LoRAMoE is the
    paper's; the balancing itself, which keeps every expert in use, is most of its effect.

    Args:
        weights: (T, E) routing weights, T = rows x L tokens in row order; token_mask: (T,) bool
            or None; rows: B, the number of sequences; num_lora: E_l, even; delta: the
            coefficient's spread.
    """
    importance = weights[:, :num_lora].float()
    if token_mask is not None:
        importance = importance * token_mask[:, None]
    importance = importance.reshape(rows, -1, num_lora).sum(dim=1)  # (B, E_l)
    coefficient = importance.new_full((num_lora,), 1.0 - delta)
    coefficient[num_lora // 2 :] = 1.0 + delta
    entries = (importance * coefficient).flatten()
    if entries.numel() < 2:
        return entries.sum() * 0.0
    return entries.var() / (entries.mean() ** 2 + 1e-10)
