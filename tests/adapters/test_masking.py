"""Structured DARE masks (dynamic merging): unbiased, the right dropped fraction, seeded."""

from __future__ import annotations

import pytest
import torch

from forgetless.adapters import structured_dare_masks
from forgetless.adapters.masking import kept_counts, masked_experts


def _delta(a, b, input_mask, output_mask, rescale):
    masked_a, masked_b = masked_experts(a, b, input_mask, output_mask)
    return rescale * torch.einsum("eor,eri->eoi", masked_b, masked_a)


def test_mean_of_many_masked_deltas_approaches_the_delta():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 24, generator=generator), torch.randn(2, 16, 4, generator=generator)
    full = torch.einsum("eor,eri->eoi", b, a)
    total = torch.zeros_like(full)
    draws = 4000
    for _ in range(draws):
        total += _delta(a, b, *structured_dare_masks(2, 24, 16, 0.5, generator))
    error = (total / draws - full).norm() / full.norm()
    assert error < 0.05
    # a single draw is far from the delta: the average is what converges
    assert (_delta(a, b, *structured_dare_masks(2, 24, 16, 0.5, generator)) - full).norm() / full.norm() > 0.3


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.9])
def test_dropped_fraction_matches_the_ratio(ratio):
    d_in, d_out = 576, 1536
    input_mask, output_mask, rescale = structured_dare_masks(
        3, d_in, d_out, ratio, torch.Generator().manual_seed(1)
    )
    kept = torch.einsum("eo,ei->eoi", output_mask, input_mask).mean(dim=(1, 2))
    assert torch.allclose(kept, torch.full((3,), 1 - ratio), atol=2e-3)
    assert rescale == pytest.approx(1 / kept[0].item())
    n_in, n_out = kept_counts(d_in, d_out, ratio)
    assert (input_mask.sum(dim=1) == n_in).all() and (output_mask.sum(dim=1) == n_out).all()


def test_masks_are_seeded_and_differ_between_experts():
    first = structured_dare_masks(2, 32, 64, 0.5, torch.Generator().manual_seed(7))
    again = structured_dare_masks(2, 32, 64, 0.5, torch.Generator().manual_seed(7))
    other = structured_dare_masks(2, 32, 64, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0][0], first[0][1])


def test_zero_ratio_keeps_everything():
    input_mask, output_mask, rescale = structured_dare_masks(2, 5, 3, 0.0, torch.Generator())
    assert input_mask.all() and output_mask.all() and rescale == 1.0
