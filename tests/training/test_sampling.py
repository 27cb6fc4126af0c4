"""Replay and joint samplers draw the stated proportions, upsample evenly, and are seeded."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from training_helpers import make_task

from forgetless.strategies import make_strategy
from forgetless.training.sampling import draw, joint_mixture, replay_count, replay_mixture


def test_draw_is_a_sample_without_replacement_when_short():
    picked = draw(list(range(10)), 4, random.Random(0))
    assert len(picked) == 4 and len(set(picked)) == 4 and set(picked) <= set(range(10))


def test_draw_upsamples_evenly():
    picked = draw(list("abc"), 8, random.Random(0))
    counts = Counter(picked)
    assert len(picked) == 8
    assert sorted(counts.values()) == [2, 3, 3]  # 8 = 2 whole copies + 2 more, never 4 of one


def test_replay_adds_a_fraction_of_the_current_size_from_each_earlier_task():
    tasks = [[f"t0-{i}" for i in range(50)], [f"t1-{i}" for i in range(3)], [f"t2-{i}" for i in range(200)]]
    mixture = dict(replay_mixture(tasks, stage=2, fraction=0.1, seed=0))
    assert mixture[2] == tasks[2]  # the current task whole
    assert len(mixture[0]) == 20 and len(set(mixture[0])) == 20  # 10% of 200, sampled
    assert len(mixture[1]) == 20  # task 1 has only 3: upsampled to 20
    assert set(mixture[1]) == set(tasks[1])
    assert sorted(Counter(mixture[1]).values()) == [6, 7, 7]


def test_replay_is_seeded():
    tasks = [[f"t0-{i}" for i in range(100)], [f"t1-{i}" for i in range(100)]]
    first = replay_mixture(tasks, 1, 0.1, seed=3)
    assert first == replay_mixture(tasks, 1, 0.1, seed=3)
    assert first != replay_mixture(tasks, 1, 0.1, seed=4)


def test_replay_count_rounds_and_keeps_one():
    assert replay_count(200, 0.1) == 20
    assert replay_count(4, 0.1) == 1
    assert replay_count(15, 0.1) == 2


def test_joint_gives_every_task_equal_size():
    tasks = [[f"a{i}" for i in range(10)], [f"b{i}" for i in range(4)], [f"c{i}" for i in range(7)]]
    mixture = dict(joint_mixture(tasks, stage=2, seed=0))
    assert {index: len(examples) for index, examples in mixture.items()} == {0: 10, 1: 10, 2: 10}
    assert mixture[0] == tasks[0]  # the largest task is taken as is
    assert sorted(Counter(mixture[1]).values()) == [2, 2, 3, 3]
    assert set(mixture[2]) == set(tasks[2])
    # stage 1 only sees tasks 0 and 1
    assert sorted(dict(joint_mixture(tasks, stage=1, seed=0))) == [0, 1]


def test_replay_strategy_stage_data_uses_its_fraction():
    tasks = [make_task("alpha", 3, size=40), make_task("beta", 5, size=30), make_task("gamma", 2, size=60)]
    strategy = make_strategy("replay", {"fraction": 0.25})
    groups = strategy.stage_data(2, tasks, seed=0)
    assert [(task.name, len(examples)) for task, examples in groups] == [
        ("gamma", 60),
        ("alpha", 15),
        ("beta", 15),
    ]


def test_joint_strategy_stage_data_is_uniform_over_tasks_so_far():
    tasks = [make_task("alpha", 3, size=5), make_task("beta", 5, size=9), make_task("gamma", 2, size=2)]
    groups = make_strategy("joint").stage_data(1, tasks, seed=0)
    assert [(task.name, len(examples)) for task, examples in groups] == [("alpha", 9), ("beta", 9)]


def test_fraction_must_be_positive():
    with pytest.raises(ValueError, match="fraction"):
        make_strategy("replay", {"fraction": 0})
