"""General suite, world knowledge: capitals of well-known countries (data from PyPI ``countryinfo``).

Asked both ways: the capital of a country, and the country of a capital. Scored by generation:
the answer counts when the expected name appears in the reply (``contains``), the way a reader
would judge "The capital of France is Paris." Only countries of at least 8 million people are
asked: the probe measures knowledge the base model mostly has, so that a drop after training is
forgetting, not noise on obscure facts.
"""

from __future__ import annotations

import random

from forgetless.data.task import Example, Task
from forgetless.tasks import general_probe, register_task

MIN_POPULATION = 8_000_000


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
    items = [Example(f"What is the capital of {country}?", capital) for country, capital in pairs]
    seen_capitals: set[str] = set()
    for country, capital in pairs:  # a capital shared by two names (Burma, Myanmar) is asked once
        if capital not in seen_capitals:
            seen_capitals.add(capital)
            items.append(Example(f"{capital} is the capital of which country?", country))
    random.Random(seed).shuffle(items)
    return general_probe(
        items,
        name="general_capitals",
        metric="contains",
        max_new_tokens=24,
        family="world_knowledge",
        description=f"capital <-> country, both ways, countries of >= {MIN_POPULATION // 1_000_000}M people "
        "(countryinfo)",
    )
