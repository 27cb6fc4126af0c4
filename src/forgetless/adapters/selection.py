"""Which experts a token takes, from its router logits: one function for every routing path.

Training and the general forward (``MixtureLinear.route``) and the folded inference plan
(``inference.inference_update``) both call ``select_experts``, so the choice is made the same way
everywhere:

- **top-K** (MixLoRA, SLIM; ``top_p`` unset): the K largest logits, softmax over those K;
- **dynamic top-p** (MixLoRA-Dy; ``top_p`` set): the experts in order of router probability
  until their cumulative probability reaches ``top_p`` (the first one always), at most
  ``top_k`` of them, with the chosen probabilities renormalised to sum to 1. A confident
  router spends one expert on a token, an unsure one several.

``chosen`` keeps a fixed width K; with top-p a slot that was not taken has weight 0
(``taken_slots``), so code that counts expert use (the balance loss) or runs experts on their
tokens (the sparse path) skips it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def select_experts(logits: Tensor, top_k: int, top_p: float | None = None) -> tuple[Tensor, Tensor]:
    """Routing weights of every expert for every token.

    Args:
        logits: (T, E) router logits, yielding shift included.
        top_k: experts per token (the most, with ``top_p``).
        top_p: cumulative router probability at which a token stops taking experts, or None.

    Returns:
        weights (T, E): 0 outside the chosen experts, summing to 1 per token; chosen (T, K) expert
        indices, best first (with ``top_p``, the slots after the cut carry weight 0).
    """
    top_logits, chosen = logits.topk(top_k, dim=1)
    if top_p is None:
        return torch.zeros_like(logits).scatter(1, chosen, torch.softmax(top_logits, dim=1)), chosen
    probabilities = torch.softmax(logits, dim=1).gather(1, chosen)
    before = probabilities.cumsum(dim=1) - probabilities  # mass of the better experts
    taken = before < top_p  # the first slot always (before = 0 < top_p)
    kept = probabilities * taken
    kept = kept / kept.sum(dim=1, keepdim=True)
    return torch.zeros_like(logits).scatter(1, chosen, kept), chosen


def taken_slots(weights: Tensor, chosen: Tensor) -> Tensor:
    """(T, K) bool: the slots of ``chosen`` that carry weight (all of them with top-K routing)."""
    return weights.gather(1, chosen) > 0
