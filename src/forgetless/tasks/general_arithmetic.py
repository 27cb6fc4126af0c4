"""General suite, arithmetic: single-digit addition and small subtraction, answered with a number.

SmolLM2-135M-Instruct is a weak calculator: with "Answer with just the number." it gets about
half of single-digit sums right (bare "What is 7 + 5?" drops to ~20% because it starts to
explain). The probe keeps the phrasing it handles, so that a drop after training is forgetting.
Scored by the last number on the reply's first line (``final_number`` with stop at newline).
"""

from __future__ import annotations

import random

from forgetless.data.task import Example, Task
from forgetless.tasks import general_probe, register_task


@register_task("general_arithmetic", suite="general")
def build(seed: int = 0) -> Task:
    suffix = "Answer with just the number."
    items = [
        Example(f"What is {a} plus {b}? {suffix}", str(a + b)) for a in range(1, 10) for b in range(1, 10)
    ]
    items += [
        Example(f"What is {a} minus {b}? {suffix}", str(a - b)) for a in range(2, 13) for b in range(1, a)
    ]
    random.Random(1000 + seed).shuffle(items)
    return general_probe(
        items,
        name="general_arithmetic",
        metric="final_number",
        max_new_tokens=12,
        family="arithmetic",
        description="single-digit addition and subtraction within 12, answered with a number",
        stop=("\n",),
    )
