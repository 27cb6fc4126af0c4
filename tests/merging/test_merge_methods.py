"""Merge methods on hand-computed 3x4 examples, and contracts every registered method must meet."""

from __future__ import annotations

import pytest
import torch

from forgetless.merging import MERGE_METHODS
from forgetless.merging.base import keep_mask, kth_largest, magnitude_trim, random_drop

# Three task vectors whose magnitudes are a permutation of 1..12 each, so that "top 6 by
# magnitude" (density 0.5) is unambiguous: every model keeps its entries of magnitude 7..12.
D1 = torch.tensor([[12.0, -1, 3, -10], [-2, 11, -4, 9], [5, -6, 8, -7]])
D2 = torch.tensor([[-9.0, 4, -12, 1], [6, -10, 2, -11], [-3, 7, 5, 8]])
D3 = torch.tensor([[2.0, 12, -5, -11], [10, 1, -9, 3], [-4, -8, 6, 7]])
BASE = torch.ones(3, 4)
MODELS = [BASE + D1, BASE + D2, BASE + D3]


def call(name, base, tensors, **params):
    method = MERGE_METHODS.get(name)
    per_model = {key: params.pop(key, [default] * len(tensors)) for key, default in method.per_model.items()}
    return method.function(base, tensors, **per_model, **params)


def test_magnitude_trim_keeps_the_top_half_by_magnitude():
    expected = torch.tensor([[12.0, 0, 0, -10], [0, 11, 0, 9], [0, 0, 8, -7]])
    assert torch.equal(magnitude_trim(D1, 0.5), expected)


def test_magnitude_trim_breaks_ties_by_lowest_index_and_keeps_exactly_k():
    delta = torch.tensor([3.0, -2, 2, 2, 1])
    # k = int(0.6 * 5) = 3: 3 and the first two 2s (indices 1 and 2) survive, index 3 does not
    assert torch.equal(magnitude_trim(delta, 0.6), torch.tensor([3.0, -2, 2, 0, 0]))
    assert torch.equal(magnitude_trim(delta, 0.01), torch.tensor([3.0, 0, 0, 0, 0]))  # at least one


def test_kth_largest_is_exact_on_large_tensors_with_ties():
    values = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0)).abs()
    values[::7] = values[0]  # a value repeated 430k times
    for k in (1, 1000, 600_000, 2_999_999):
        assert kth_largest(values, k) == torch.kthvalue(values, values.numel() - k + 1).values
    ascending = torch.arange(2_000_000, dtype=torch.float32)  # sorted input, no randomness
    assert kth_largest(ascending, 400_000) == 1_600_000


def test_magnitude_trim_on_a_large_tensor_keeps_exactly_k_lowest_index_ties_first():
    delta = torch.randn(1500, 1000, generator=torch.Generator().manual_seed(1))
    delta.view(-1)[::5] = 1.25  # 20% of the entries share one magnitude, straddling the cut
    trimmed = magnitude_trim(delta, 0.2)
    k = int(0.2 * delta.numel())
    kept = trimmed.view(-1) != 0
    assert int(kept.sum()) == k
    assert delta.view(-1)[kept].abs().min() >= delta.view(-1)[~kept].abs().max()
    tied = (delta.view(-1).abs() == delta.view(-1)[kept].abs().min()).nonzero().squeeze(1)
    kept_ties = kept[tied]
    assert 0 < int(kept_ties.sum()) < tied.numel()  # the cut falls inside the tie
    assert torch.equal(kept_ties, kept_ties.sort(descending=True).values)  # kept ones come first
    plain = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    assert torch.equal(magnitude_trim(plain.T, 0.2), magnitude_trim(plain, 0.2).T)  # non-contiguous input


def test_ties_equal_weights_by_hand():
    # trimmed sums per entry elect the signs [[+,+,-,-],[+,+,-,-],[+,-,+,+]]; the agreeing entries
    # are averaged: e.g. [0,3]: (-10 + -11) / 2 = -10.5, [2,3]: (8 + 7) / 2 = 7.5 (-7 disagrees)
    delta = torch.tensor([[12.0, 12, -12, -10.5], [10, 11, -9, -11], [0, -8, 8, 7.5]])
    merged = call("ties", BASE, MODELS, density=[0.5] * 3)
    assert torch.equal(merged, BASE + delta)


def test_ties_weights_change_the_elected_sign_and_lambda_scales():
    # weight 2 on model 1 flips [1,3]: 2*9 - 11 = 7 > 0, so only 2*9 joins: 18 / 2 = 9.
    # [0,3]: (2*-10 + -11) / (2 + 1) = -31/3. Then lambda 0.5 halves the merged task vector.
    delta = torch.tensor([[12.0, 12, -12, -31 / 3], [10, 11, -9, 9], [0, -8, 8, 7.5]])
    merged = call("ties", BASE, MODELS, weight=[2.0, 1.0, 1.0], density=[0.5] * 3, lambda_=0.5)
    torch.testing.assert_close(merged, BASE + 0.5 * delta, rtol=0, atol=1e-6)


def test_task_arithmetic_by_hand():
    # d1 + 0.5 d2 + 2 d3, times lambda 0.5
    summed = torch.tensor([[11.5, 25, -13, -31.5], [21, 8, -21, 9.5], [-4.5, -18.5, 22.5, 11]])
    merged = call("task_arithmetic", BASE, MODELS, weight=[1.0, 0.5, 2.0], lambda_=0.5)
    assert torch.equal(merged, BASE + 0.5 * summed)


def test_average_by_hand():
    merged = call("average", None, MODELS, weight=[1.0, 2.0, 1.0])
    assert torch.equal(merged, (MODELS[0] + 2 * MODELS[1] + MODELS[2]) / 4)
    unnormalized = call("average", None, MODELS, weight=[1.0, 2.0, 1.0], normalize=False)
    assert torch.equal(unnormalized, MODELS[0] + 2 * MODELS[1] + MODELS[2])


def test_keep_mask_is_pinned_and_stream_dependent():
    mask = keep_mask(torch.Size([3, 4]), 0.5, seed=0, stream=0)
    # pinned: a different mask after a refactor would silently change every DARE merge
    expected = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert not torch.equal(mask, keep_mask(torch.Size([3, 4]), 0.5, seed=0, stream=1))
    assert torch.equal(mask, keep_mask(torch.Size([3, 4]), 0.5, seed=0, stream=0))


def test_keep_mask_rate_over_several_blocks():
    big = keep_mask(torch.Size([2_500_003]), 0.3, seed=3, stream=2)  # three 2^20 blocks
    assert abs(big.float().mean().item() - 0.3) < 0.002
    assert torch.equal(big, keep_mask(torch.Size([2_500_003]), 0.3, seed=3, stream=2))
    # blocks draw from different generators (no repeated pattern)
    assert not torch.equal(big[: 1 << 20], big[1 << 20 : 2 << 20])


def test_dare_drops_and_rescales_each_task_vector():
    merged = call("dare", BASE, [MODELS[0]], density=[0.5], seed=11)
    mask = keep_mask(torch.Size([3, 4]), 0.5, seed=11, stream=0)
    # kept entries: base + d / 0.5; dropped entries: the base
    assert torch.equal(merged, torch.where(mask, BASE + D1 * 2, BASE))
    assert 0 < int(mask.sum()) < 12


def test_dare_l1_rescale_restores_the_norm():
    dropped = random_drop(D1, 0.5, seed=5, stream=0, rescale="l1")
    torch.testing.assert_close(dropped.abs().sum(), D1.abs().sum())
    assert torch.equal(random_drop(D1, 0.5, 5, 0, "none") * 2, random_drop(D1, 0.5, 5, 0, "inverse_density"))
    with pytest.raises(ValueError, match="rescale"):
        random_drop(D1, 0.5, 5, 0, "l3")


def test_dare_and_dare_ties_at_density_one_reduce_to_task_arithmetic_and_ties():
    ta = call("task_arithmetic", BASE, MODELS, weight=[1.0, 0.5, 2.0])
    assert torch.equal(call("dare", BASE, MODELS, weight=[1.0, 0.5, 2.0], seed=1), ta)
    ties = call("ties", BASE, MODELS, weight=[1.0, 0.5, 2.0])
    assert torch.equal(call("dare_ties", BASE, MODELS, weight=[1.0, 0.5, 2.0], normalize=True, seed=1), ties)


def test_lora_average_averages_factors_with_scaling_folded_into_b():
    a1, b1 = torch.arange(6.0).reshape(2, 3), torch.arange(8.0).reshape(4, 2)
    a2, b2 = -torch.ones(2, 3), torch.ones(4, 2)
    method = MERGE_METHODS.get("lora_average")
    a, b = method.function([(a1, b1, 2.0), (a2, b2, 0.5)], weight=[1.0, 3.0])
    assert torch.equal(a, (a1 + 3 * a2) / 4)
    assert torch.equal(b, (2.0 * b1 + 3 * 0.5 * b2) / 4)
    # the naive merge is not the average of the dense deltas (cross terms), which is why we keep both
    assert not torch.allclose(b @ a, (2.0 * b1 @ a1 + 3 * 0.5 * b2 @ a2) / 4)


@pytest.mark.parametrize("name", [name for name, m in MERGE_METHODS.items() if m.inputs == "tensors"])
def test_every_method_returns_the_model_when_all_inputs_are_that_model(name):
    torch.manual_seed(0)
    base, model = torch.randn(6, 5), torch.randn(6, 5)
    method = MERGE_METHODS.get(name)
    params = {"seed": 3} if method.random else {}
    merged = call(name, base, [model] * 3, weight=[1 / 3] * 3, **params)
    torch.testing.assert_close(merged, model, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [name for name, m in MERGE_METHODS.items() if m.inputs == "tensors"])
def test_every_method_is_pure_and_deterministic(name):
    torch.manual_seed(1)
    base, models = torch.randn(4, 4), [torch.randn(4, 4) for _ in range(2)]
    copies = [m.clone() for m in models]
    method = MERGE_METHODS.get(name)
    params = {"seed": 9} if method.random else {}
    per_model = {key: [0.5] * 2 for key in method.per_model}
    first = method.function(base, models, **per_model, **params)
    assert torch.equal(first, method.function(base, models, **per_model, **params))
    assert all(torch.equal(m, c) for m, c in zip(models, copies))
    assert first.shape == (4, 4)
