"""General suite, ordered sequences: the day, month or letter that comes before or after another.

Everyday ordering knowledge every instruct model is taught (weekdays, months, the alphabet),
asked in one plain phrasing and scored with ``contains`` on the reply (the expected word or
letter as a whole word). A model that forgot its answer format ("Tuesday" -> "answer2") or the
order itself fails here.
"""

from __future__ import annotations

import random
import string

from forgetless.data.task import Example, Task
from forgetless.tasks import general_probe, register_task

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]  # fmt: skip


def _cyclic(kind: str, names: list[str]) -> list[Example]:
    items = []
    for index, name in enumerate(names):
        after, before = names[(index + 1) % len(names)], names[index - 1]
        items.append(Example(f"Which {kind} comes after {name}? Answer with one word.", after))
        items.append(Example(f"Which {kind} comes before {name}? Answer with one word.", before))
    return items


@register_task("general_sequences", suite="general")
def build(seed: int = 0) -> Task:
    letters = string.ascii_uppercase
    items = _cyclic("day", DAYS) + _cyclic("month", MONTHS)
    items += [
        Example(
            f"Which letter of the alphabet comes after {letters[i]}? Answer with the letter.", letters[i + 1]
        )
        for i in range(len(letters) - 1)
    ]
    items += [
        Example(
            f"Which letter of the alphabet comes before {letters[i]}? Answer with the letter.", letters[i - 1]
        )
        for i in range(2, len(letters))  # not "A": the scorer's normalisation drops it as an article
    ]
    random.Random(2000 + seed).shuffle(items)
    return general_probe(
        items,
        name="general_sequences",
        metric="contains",
        max_new_tokens=12,
        family="ordering",
        description="weekday, month or letter before/after another",
    )
