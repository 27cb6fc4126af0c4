"""Continual-learning metrics as pure functions of the accuracy matrix (README.md, "An experiment is
one YAML").

``R`` has one row per evaluation point and one column per task: row 0 is the base model, row ``i``
the model after stage ``i`` (``S`` stages, so ``S + 1`` rows). ``learned_at[j]`` is the row after
which task ``j`` was trained (sequential training: task ``j`` at row ``j + 1``; joint training or a
merge of one-round models: every task at the single last row). Cells may be ``None`` (not
evaluated); a metric that needs a missing cell, or divides by a zero score, is ``None``.

- acquisition of task j:      ``R[s_j][j]``
- final average:              mean_j ``R[S][j]``
- BWT (paper, relative):      ``(R[S][j] - R[s_j][j]) / R[s_j][j]`` for tasks learned before the last stage
- BWT (absolute):             mean over those tasks of ``R[S][j] - R[s_j][j]`` (Lopez-Paz & Ranzato)
- FWT:                        ``R[s_j - 1][j] - R[0][j]`` for tasks learned after the first stage
- gain from base:             ``(R[S][j] - R[0][j]) / R[0][j]`` (tasks, and each general family of ``G``)
- retention of general ability: mean general score after stage i / mean general score of the base
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Cell = float | None
Matrix = Sequence[Sequence[Cell]]


def _mean(values: Sequence[Cell]) -> Cell:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _ratio_change(new: Cell, old: Cell) -> Cell:
    if new is None or old is None or old == 0:
        return None
    return (new - old) / old


def default_learned_at(n_stages: int, n_tasks: int) -> list[int | None]:
    """Where each task was learned when nobody says: stage j trains task j (sequential), or one
    stage trains them all (joint / merged / mixed); ``None`` (never trained) otherwise."""
    if n_stages == n_tasks:
        return list(range(1, n_tasks + 1))
    if n_stages == 1:
        return [1] * n_tasks
    return [None] * n_tasks


def _check(matrix: Matrix, learned_at: Sequence[int | None] | None) -> tuple[int, list[int | None]]:
    if len(matrix) < 1:
        raise ValueError("the accuracy matrix needs at least the base row")
    width = len(matrix[0])
    if any(len(row) != width for row in matrix):
        raise ValueError("every row of the accuracy matrix must have one cell per task")
    last = len(matrix) - 1
    learned = list(learned_at) if learned_at is not None else default_learned_at(last, width)
    if len(learned) != width:
        raise ValueError(f"learned_at has {len(learned)} entries for {width} tasks")
    for stage in learned:
        if stage is not None and not 1 <= stage <= last:
            raise ValueError(f"learned_at entry {stage} is not a stage row (1..{last})")
    return last, learned


def row_averages(matrix: Matrix) -> list[Cell]:
    """The AVE column of the paper's tables: mean over tasks of each row."""
    return [_mean(row) for row in matrix]


def acquisition(matrix: Matrix, learned_at: Sequence[int | None] | None = None) -> list[Cell]:
    """``R[s_j][j]`` per task: the score right after the task was trained."""
    _, learned = _check(matrix, learned_at)
    return [None if s is None else matrix[s][j] for j, s in enumerate(learned)]


def final_average(matrix: Matrix) -> Cell:
    """Mean over tasks of the last row."""
    return _mean(matrix[-1])


def bwt_per_task(
    matrix: Matrix, learned_at: Sequence[int | None] | None = None, relative: bool = True
) -> list[Cell]:
    """Backward transfer of each task learned before the last stage (``None`` for the others).

    ``relative=True`` is the paper's form ``(R[S][j] - R[s_j][j]) / R[s_j][j]``; ``False`` the
    absolute difference.
    """
    last, learned = _check(matrix, learned_at)
    out: list[Cell] = []
    for j, s in enumerate(learned):
        if s is None or s == last or matrix[last][j] is None or matrix[s][j] is None:
            out.append(None)
        elif relative:
            out.append(_ratio_change(matrix[last][j], matrix[s][j]))
        else:
            out.append(matrix[last][j] - matrix[s][j])
    return out


def bwt(matrix: Matrix, learned_at: Sequence[int | None] | None = None, relative: bool = True) -> Cell:
    """Mean backward transfer over the tasks learned before the last stage."""
    return _mean(bwt_per_task(matrix, learned_at, relative))


def fwt_per_task(matrix: Matrix, learned_at: Sequence[int | None] | None = None) -> list[Cell]:
    """``R[s_j - 1][j] - R[0][j]``: what earlier stages did for task j before it was trained."""
    _, learned = _check(matrix, learned_at)
    out: list[Cell] = []
    for j, s in enumerate(learned):
        if s is None or s < 2 or matrix[s - 1][j] is None or matrix[0][j] is None:
            out.append(None)
        else:
            out.append(matrix[s - 1][j] - matrix[0][j])
    return out


def fwt(matrix: Matrix, learned_at: Sequence[int | None] | None = None) -> Cell:
    """Mean forward transfer over the tasks learned after the first stage."""
    return _mean(fwt_per_task(matrix, learned_at))


def gain_from_base(matrix: Matrix) -> list[Cell]:
    """``(R[S][j] - R[0][j]) / R[0][j]`` per column (``None`` where the base scored 0)."""
    return [_ratio_change(final, base) for final, base in zip(matrix[-1], matrix[0])]


def retention(general: Matrix) -> list[Cell]:
    """Mean general score after each stage divided by the base's (1.0 = nothing forgotten)."""
    averages = row_averages(general)
    return [None if a is None or not averages[0] else a / averages[0] for a in averages]


def continual_metrics(
    matrix: Matrix, general: Matrix | None = None, learned_at: Sequence[int | None] | None = None
) -> dict[str, Any]:
    """Every metric of one method, from ``R`` (and the general-suite matrix ``G``, same rows)."""
    last, learned = _check(matrix, learned_at)
    averages = row_averages(matrix)
    gains = gain_from_base(matrix)
    out: dict[str, Any] = {
        "learned_at": learned,
        "acquisition": acquisition(matrix, learned),
        "acquisition_average": _mean(acquisition(matrix, learned)),
        "final": list(matrix[last]),
        "final_average": averages[last],
        "average_per_stage": averages,
        "bwt_per_task": bwt_per_task(matrix, learned, relative=True),
        "bwt": bwt(matrix, learned, relative=True),
        "bwt_absolute_per_task": bwt_per_task(matrix, learned, relative=False),
        "bwt_absolute": bwt(matrix, learned, relative=False),
        "fwt_per_task": fwt_per_task(matrix, learned),
        "fwt": fwt(matrix, learned),
        "gain_from_base": gains,
        "gain_average": _ratio_change(averages[last], averages[0]),
        "gain_mean_of_tasks": _mean(gains),
    }
    if general is not None and len(general) > 0:
        if len(general) != len(matrix):
            raise ValueError(f"the general matrix has {len(general)} rows, the task matrix {len(matrix)}")
        general_averages = row_averages(general)
        kept = retention(general)
        out.update(
            {
                "general_final": list(general[-1]),
                "general_average_per_stage": general_averages,
                "general_gain_from_base": gain_from_base(general),
                "general_gain_average": _ratio_change(general_averages[-1], general_averages[0]),
                "retention_per_stage": kept,
                "retention": kept[-1],
            }
        )
    return out
