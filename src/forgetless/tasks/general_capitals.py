"""General suite, world knowledge: capitals of well-known countries (data from PyPI ``countryinfo``).

Scored by generation: the answer counts when the capital's name appears in the reply
(``contains``), the way a reader would judge "The capital of France is Paris." Only countries of
at least 25 million people are asked: the probe measures knowledge the base model has, so that a
drop after training is forgetting, not noise on obscure facts.
"""

from __future__ import annotations

import random

from forgetless.data.task import Example, Task
from forgetless.tasks import register_task

MIN_POPULATION = 25_000_000


def _countries() -> list[tuple[str, str]]:
    import countryinfo

    pairs = []
    for country in countryinfo.all_countries():
        capital, population = country.capital(), country.population() or 0
        if capital and population >= MIN_POPULATION:
            pairs.append((country.name(), capital))
    return sorted(pairs)


@register_task("general_capitals", suite="general")
def build(seed: int = 0) -> Task:
    pairs = _countries()
    random.Random(seed).shuffle(pairs)
    test = [Example(f"What is the capital of {country}?", capital) for country, capital in pairs]
    return Task(
        name="general_capitals",
        train=[],
        test=test,
        metric="contains",
        max_new_tokens=24,
        kind="general",
        family="world_knowledge",
        description=f"capital of each country of >= {MIN_POPULATION // 1_000_000}M people (countryinfo)",
    )
