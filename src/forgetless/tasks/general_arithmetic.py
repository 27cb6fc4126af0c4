"""General suite, arithmetic: single-digit addition, answered with a number.

SmolLM2-135M-Instruct is a weak calculator: with "Answer with just the number." it gets about
half of single-digit sums right (bare "What is 7 + 5?" drops to ~20% because it starts to
explain). The probe keeps the phrasing it handles, so that a drop after training is forgetting.
Scored by the last number on the reply's first line (``final_number`` with stop at newline).
"""

from __future__ import annotations

import random

from forgetless.data.task import Example, Task
from forgetless.tasks import register_task


@register_task("general_arithmetic", suite="general")
def build(seed: int = 0) -> Task:
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    random.Random(1000 + seed).shuffle(pairs)
    test = [Example(f"What is {a} plus {b}? Answer with just the number.", str(a + b)) for a, b in pairs[:40]]
    return Task(
        name="general_arithmetic",
        train=[],
        test=test,
        metric="final_number",
        max_new_tokens=12,
        kind="general",
        family="arithmetic",
        description="single-digit addition answered with a number",
        stop=("\n",),
    )
