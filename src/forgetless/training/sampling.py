"""Replay and joint samplers: which earlier-task examples join a stage, and how many.

Paper 2 ("Collaboratively adding new knowledge", fully-cooperative setting):

- **replay**: each earlier task adds ``fraction`` (10 %) of the *current* task's training size,
  drawn at random; a task with fewer examples than that is upsampled (repeated whole, then the
  remainder drawn without replacement), as the paper does for its 395K-example math task.
- **joint**: all tasks so far at once, with uniform task probability: every task is upsampled to
  the size of the largest, so a random training example is equally likely to come from any task.

Both are pure functions of (sizes, seed): the same seed gives the same examples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def draw(examples: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``count`` examples: whole copies of ``examples`` while they fit, then a sample without replacement.

    Every example appears ``count // len`` or ``count // len + 1`` times (upsampling is as even as it
    can be); ``count <= len(examples)`` is a plain random sample.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count and not examples:
        raise ValueError("cannot draw examples from an empty list")
    copies, remainder = divmod(count, len(examples)) if examples else (0, 0)
    picked = [example for _ in range(copies) for example in examples]
    picked.extend(examples[index] for index in sorted(rng.sample(range(len(examples)), remainder)))
    return picked


def replay_count(current_size: int, fraction: float) -> int:
    """Examples each earlier task contributes: ``round(fraction * current_size)``, at least 1 when > 0."""
    if fraction <= 0:
        return 0
    return max(1, round(fraction * current_size))


def replay_mixture(
    tasks: Sequence[Sequence[T]], stage: int, fraction: float, seed: int
) -> list[tuple[int, list[T]]]:
    """Training data of ``stage`` under replay: the current task whole plus a share of each earlier one.

    Args:
        tasks: training examples of every task, in sequence order.
        stage: index of the current task.
        fraction: share of the current task's size drawn from *each* earlier task.
        seed: sampling seed (combined with the stage and task index).

    Returns:
        ``[(task_index, examples), ...]``: the current task first, then tasks 0..stage-1.
    """
    current = list(tasks[stage])
    count = replay_count(len(current), fraction)
    mixture = [(stage, current)]
    for earlier in range(stage):
        rng = random.Random(f"replay|{seed}|{stage}|{earlier}")
        mixture.append((earlier, draw(tasks[earlier], count, rng)))
    return mixture


def joint_mixture(tasks: Sequence[Sequence[T]], stage: int, seed: int) -> list[tuple[int, list[T]]]:
    """Training data of ``stage`` under joint training: tasks 0..stage, each upsampled to the largest.

    Returns:
        ``[(task_index, examples), ...]`` for tasks 0..stage, each of ``max_j len(tasks[j])`` examples.
    """
    size = max(len(tasks[index]) for index in range(stage + 1))
    mixture = []
    for index in range(stage + 1):
        rng = random.Random(f"joint|{seed}|{stage}|{index}")
        examples = list(tasks[index])
        mixture.append((index, examples if len(examples) == size else draw(examples, size, rng)))
    return mixture
