"""Dynamic merging, fast version (step 6 of slim.py's docstring): structured DARE masks for stacked LoRA experts.

DARE drops a random fraction ``p`` of a task vector's entries and rescales the rest by
``1 / (1 - p)``. For a LoRA update ``B A`` (d_out x d_in) SLIM drops whole rows of ``B`` and whole
columns of ``A`` instead, which removes whole rows/columns of ``B A`` at no extra cost. Keeping
``n_out`` of ``d_out`` rows and ``n_in`` of ``d_in`` columns keeps the fraction
``f = (n_out / d_out) (n_in / d_in)`` of ``B A``; we pick ``n_in ~ d_in sqrt(1 - p)`` and the
``n_out`` that brings ``f`` closest to ``1 - p``, then rescale by ``1 / f``: every entry of ``B A``
is kept with probability ``f``, so the masked update is unbiased.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kept_counts(d_in: int, d_out: int, mask_ratio: float) -> tuple[int, int]:
    """``(n_in, n_out)``: columns of A and rows of B kept so that ``n_in n_out / (d_in d_out) ~ 1 - p``."""
    keep = 1.0 - mask_ratio
    n_in = min(max(round(d_in * math.sqrt(keep)), 1), d_in)
    n_out = min(max(round(keep * d_in * d_out / n_in), 1), d_out)
    return n_in, n_out


def _exact_count_masks(rows: int, dim: int, kept: int, generator: torch.Generator) -> Tensor:
    """(rows, dim) float masks with exactly ``kept`` ones per row at seeded random places."""
    scores = torch.rand(rows, dim, generator=generator)
    mask = torch.zeros(rows, dim)
    return mask.scatter_(1, scores.topk(kept, dim=1).indices, 1.0)


def structured_dare_masks(
    num_experts: int, d_in: int, d_out: int, mask_ratio: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, float]:
    """Masks for ``E`` experts and the unbiasing rescale.

    Returns:
        (input_mask (E, d_in), output_mask (E, d_out), rescale = 1 / f): apply as
        ``A' = A * input_mask[:, None, :]`` (columns of A) and ``B' = B * output_mask[:, :, None]``
        (rows of B); the update ``rescale * B' A'`` equals ``B A`` in expectation.
    """
    if mask_ratio <= 0:
        return torch.ones(num_experts, d_in), torch.ones(num_experts, d_out), 1.0
    n_in, n_out = kept_counts(d_in, d_out, mask_ratio)
    input_mask = _exact_count_masks(num_experts, d_in, n_in, generator)
    output_mask = _exact_count_masks(num_experts, d_out, n_out, generator)
    kept_fraction = (n_in / d_in) * (n_out / d_out)
    return input_mask, output_mask, 1.0 / kept_fraction


def masked_experts(
    lora_a: Tensor, lora_b: Tensor, input_mask: Tensor, output_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """``A' = MASK(A, S_col)``, ``B' = MASK(B, S_row)``. lora_a: (E, r, d_in), lora_b: (E, d_out, r)."""
    a = lora_a * input_mask.to(lora_a)[:, None, :]
    b = lora_b * output_mask.to(lora_b)[:, :, None]
    return a, b
