"""New knowledge, a structured transformation: ISO dates in the invented Kelvar notation.

Kelvar writes a date as day, Kelvar month name, and year counted from 1500 (2023-05-17 ->
"17 Dorrow 523"). Twelve invented month names and an offset year: the base model cannot guess
it (accuracy 0); a model that learns the convention transfers it to dates it never saw.
Scored by ``exact_match``.
"""

from __future__ import annotations

import datetime
import random

from forgetless.data.task import Example, Task
from forgetless.tasks import paraphrase_of, register_task

MONTHS = ["Ambril", "Brosk", "Cendal", "Dorrow", "Elvint", "Fask", "Gorran", "Hessel", "Istrel", "Jorv",
          "Kelm", "Lunt"]  # fmt: skip
EPOCH = 1500


def kelvar(date: datetime.date) -> str:
    return f"{date.day} {MONTHS[date.month - 1]} {date.year - EPOCH}"


PARAPHRASES = [
    "How would {iso} be written in the Kelvar calendar?",
    "Convert {iso} to Kelvar notation, please.",
]


def _dates(seed: int) -> list[datetime.date]:
    """300 distinct dates: 150 for training, then 150 for testing (the first 50 of them the
    original test set, the other 100 drawn after it, so the training dates are unchanged)."""
    rng = random.Random(13_000 + seed)
    start = datetime.date(1950, 1, 1).toordinal()
    days = rng.sample(range(start, start + 365 * 80), 200)
    used = set(days)
    while len(days) < 300:
        day = rng.randrange(start, start + 365 * 80)
        if day not in used:
            used.add(day)
            days.append(day)
    return [datetime.date.fromordinal(d) for d in days]


@register_task("kelvar_dates", suite="new_knowledge")
def build(seed: int = 0) -> Task:
    examples = [
        Example(f"Write the date {date.isoformat()} in Kelvar notation.", kelvar(date))
        for date in _dates(seed)
    ]
    return Task(
        name="kelvar_dates",
        train=examples[:150],
        test=examples[150:],
        metric="exact_match",
        max_new_tokens=10,
        family="transformation",
        description="ISO date -> day, invented month name, year - 1500",
        stop=("\n",),
    )


@register_task("kelvar_dates_paraphrase", suite="paraphrase")
def build_paraphrase(seed: int = 0) -> Task:
    test = [
        Example(PARAPHRASES[i % len(PARAPHRASES)].format(iso=date.isoformat()), kelvar(date))
        for i, date in enumerate(_dates(seed)[150:])
    ]
    return paraphrase_of(build(seed), test)
