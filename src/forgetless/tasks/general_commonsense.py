"""General suite, common sense by log-likelihood: 48 everyday three-way multiple-choice questions.

Written for forgetless (``data/commonsense_mc.json``); the choice order is shuffled by the seed.
Scored as lm-eval scores multiple choice (``loglik_mc``): the choice with the highest summed
log-probability as the answer's continuation wins; chance is 1/3.
"""

from __future__ import annotations

import json
import random
from importlib.resources import files

from forgetless.data.task import Example, Task
from forgetless.tasks import general_probe, register_task


@register_task("general_commonsense", suite="general")
def build(seed: int = 0) -> Task:
    items = json.loads(
        files("forgetless.tasks").joinpath("data/commonsense_mc.json").read_text(encoding="utf-8")
    )
    rng = random.Random(seed)
    test = []
    for question, choices, gold in items:
        order = list(range(len(choices)))
        rng.shuffle(order)
        shuffled = tuple(choices[i] for i in order)
        test.append(Example(question, choices[gold], choices=shuffled, gold=order.index(gold)))
    return general_probe(
        test,
        name="general_commonsense",
        metric="loglik_mc",
        max_new_tokens=8,
        family="commonsense",
        description="everyday 3-way multiple choice, scored by log-likelihood (chance 1/3)",
    )
