"""Sliding clustering and the distance d(x): hand-computed values for each reduction and calibration."""

from __future__ import annotations

import pytest
import torch

from forgetless.adapters import SlidingClusters


def _clusters(reduction="max", calibration="ratio", momentum=0.5, count=1, dim=4):
    return SlidingClusters(count, dim, momentum, reduction, quantile=0.75, calibration=calibration, seed=0)


@pytest.mark.parametrize(("reduction", "expected"), [("max", 3.0), ("mean", 1.5), ("quantile", 2.0)])
def test_raw_distance_reductions(reduction, expected):
    clusters = _clusters(reduction)
    x = torch.tensor([[1.0, -3.0, 2.0, 0.0]])  # centre 0, unit variance: |z| = (1, 3, 2, 0)
    assert clusters.raw_distance(x, torch.tensor([0])).item() == pytest.approx(expected)


@pytest.mark.parametrize(("calibration", "expected"), [("ratio", 0.5), ("zscore", 1.0), ("none", 2.0)])
def test_calibrations(calibration, expected):
    clusters = _clusters(calibration=calibration)
    clusters.reference_mean.fill_(2.0)
    clusters.reference_square.fill_(5.0)  # variance 5 - 4 = 1
    assert clusters.calibrate(torch.tensor([3.0])).item() == pytest.approx(expected)


def test_sliding_update_is_an_ema_of_assigned_tokens():
    clusters = _clusters(count=2, dim=2, momentum=0.5)
    clusters.centres.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    clusters.variances.fill_(1.0)
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0], [9.0, 9.0]])
    assignment = clusters.nearest(x)
    assert assignment.tolist() == [0, 0, 1]
    clusters.update(x, assignment)
    # centre 0: 0.5 * 0 + 0.5 * mean((1,2),(3,2)) = (1, 1); variance around it: mean((x - mu)^2) = (2, 1)
    torch.testing.assert_close(clusters.centres[0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(clusters.variances[0], torch.tensor([0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 1]))
    torch.testing.assert_close(clusters.centres[1], torch.tensor([9.5, 9.5]))
    torch.testing.assert_close(clusters.variances[1], torch.tensor([0.5 + 0.5 * 0.25, 0.5 + 0.5 * 0.25]))


def test_nearest_uses_standardised_distance():
    clusters = _clusters(count=2, dim=2)
    clusters.centres.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
    clusters.variances.copy_(torch.tensor([[1.0, 1.0], [16.0, 1.0]]))  # centre 1 is wide along channel 0
    # (1.5, 0): Euclidean nearer centre 0 (1.5 vs 2.5); standardised 2.25 vs 2.5^2 / 16 -> centre 1
    assert clusters.nearest(torch.tensor([[1.5, 0.0]])).tolist() == [1]


def test_first_batch_initialises_and_sets_reference():
    clusters = _clusters(count=2, dim=3)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    calibrated, raw = clusters(x, None, learn=True)
    assert bool(clusters.initialised)
    assert clusters.reference_mean.item() == pytest.approx(raw.mean().item())
    assert calibrated.mean().abs() < 1e-5  # ratio calibration is centred on the in-domain batch
    frozen = clusters.state_dict()
    frozen = {k: v.clone() for k, v in frozen.items()}
    clusters(x * 5, None, learn=False)
    assert all(torch.equal(frozen[k], v) for k, v in clusters.state_dict().items())
