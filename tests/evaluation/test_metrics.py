"""Continual metrics on hand-worked accuracy matrices (DESIGN.md definitions)."""

from __future__ import annotations

import pytest

from forgetless.evaluation.metrics import (
    acquisition,
    bwt,
    bwt_per_task,
    continual_metrics,
    final_average,
    fwt,
    fwt_per_task,
    gain_from_base,
    retention,
    row_averages,
)

# base + three sequential stages; task j is trained in stage j
R = [
    [0.2, 0.1, 0.5],
    [0.8, 0.2, 0.4],
    [0.6, 0.9, 0.5],
    [0.4, 0.6, 1.0],
]
G = [[0.5, 0.8], [0.5, 0.7], [0.4, 0.6], [0.3, 0.5]]


def test_sequential_matrix_by_hand():
    assert acquisition(R) == [0.8, 0.9, 1.0]
    assert final_average(R) == pytest.approx(2.0 / 3)
    # (0.4 - 0.8) / 0.8 = -0.5 ; (0.6 - 0.9) / 0.9 = -1/3 ; the last task has no BWT
    assert bwt_per_task(R) == pytest.approx([-0.5, -1 / 3, None])
    assert bwt(R) == pytest.approx((-0.5 - 1 / 3) / 2)
    assert bwt_per_task(R, relative=False) == pytest.approx([-0.4, -0.3, None])
    assert bwt(R, relative=False) == pytest.approx(-0.35)
    # R[1][1] - R[0][1] = 0.1 ; R[2][2] - R[0][2] = 0.0
    assert fwt_per_task(R) == pytest.approx([None, 0.1, 0.0])
    assert fwt(R) == pytest.approx(0.05)
    assert gain_from_base(R) == pytest.approx([1.0, 5.0, 1.0])
    assert row_averages(R) == pytest.approx([0.8 / 3, 1.4 / 3, 2.0 / 3, 2.0 / 3])
    assert retention(G) == pytest.approx([1.0, 0.6 / 0.65, 0.5 / 0.65, 0.4 / 0.65])


def test_continual_metrics_bundle():
    metrics = continual_metrics(R, G)
    assert metrics["learned_at"] == [1, 2, 3]
    assert metrics["acquisition_average"] == pytest.approx(0.9)
    assert metrics["gain_average"] == pytest.approx((2.0 / 3 - 0.8 / 3) / (0.8 / 3))  # 1.5
    assert metrics["gain_mean_of_tasks"] == pytest.approx(7 / 3)
    assert metrics["general_gain_from_base"] == pytest.approx([-0.4, -0.375])
    assert metrics["retention"] == pytest.approx(0.4 / 0.65)
    assert metrics["general_average_per_stage"] == pytest.approx([0.65, 0.6, 0.5, 0.4])


def test_three_by_three_with_a_stage_that_trains_two_tasks():
    """Like the paper's math stage (gsm8k and gsm-cot): stage 2 trains tasks 2 and 3."""
    matrix = [[0.5, 0.0, 0.25], [1.0, 0.0, 0.25], [0.75, 0.5, 1.0]]
    learned = [1, 2, 2]
    assert acquisition(matrix, learned) == [1.0, 0.5, 1.0]
    assert bwt_per_task(matrix, learned) == pytest.approx([-0.25, None, None])
    assert fwt_per_task(matrix, learned) == pytest.approx([None, 0.0, 0.0])
    # the base scored 0 on task 2: its relative gain is undefined, not infinite
    assert gain_from_base(matrix) == pytest.approx([0.5, None, 3.0])
    metrics = continual_metrics(matrix, learned_at=learned)
    assert metrics["gain_mean_of_tasks"] == pytest.approx(1.75)
    assert metrics["final_average"] == pytest.approx(0.75)
    assert "retention" not in metrics


def test_single_stage_methods_and_missing_cells():
    joint = [[0.2, 0.4], [0.6, 0.8]]  # joint training / a merge: one stage learns every task
    metrics = continual_metrics(joint)
    assert metrics["learned_at"] == [1, 1] and metrics["acquisition"] == [0.6, 0.8]
    assert metrics["bwt"] is None and metrics["fwt"] is None
    holes = [[0.2, None], [0.5, 0.4], [0.3, 0.6]]
    assert bwt_per_task(holes) == pytest.approx([-0.4, None])
    assert row_averages(holes) == pytest.approx([0.2, 0.45, 0.45])


def test_malformed_matrices_are_rejected():
    with pytest.raises(ValueError, match="one cell per task"):
        acquisition([[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError, match="learned_at"):
        acquisition(R, learned_at=[1, 2])
    with pytest.raises(ValueError, match="not a stage row"):
        acquisition(R, learned_at=[0, 1, 2])
    with pytest.raises(ValueError, match="rows"):
        continual_metrics(R, G[:2])
