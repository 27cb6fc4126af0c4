"""New knowledge, an arithmetic format: the invented operator "glorp".

``a glorp b`` orders the two numbers, larger first, and joins them with a colon
(7 glorp 31 -> "31:7", 52 glorp 9 -> "52:9"). The base model has never seen the operator
(accuracy 0); learning it takes a comparison of two-digit numbers and an output format.
A first version also asked for the difference ("max:difference"): after two epochs of LoRA the
135M model got the maximum right and the difference wrong (14% exact), too slow for a built-in
task meant to be learned in about a minute. Test pairs never appear in training. Scored by
``exact_match``.
"""

from __future__ import annotations

import random

from forgetless.data.task import Example, Task
from forgetless.tasks import paraphrase_of, register_task


def glorp(a: int, b: int) -> str:
    return f"{max(a, b)}:{min(a, b)}"


PARAPHRASES = ["Compute {a} glorp {b}.", "Tell me the result of {a} glorp {b}, please."]


def _pairs(seed: int) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(100) for b in range(100) if a != b]
    random.Random(17_000 + seed).shuffle(pairs)
    return pairs[:320]  # 170 training pairs, then 150 test pairs (the first 50 the original test set)


@register_task("glorp_arithmetic", suite="new_knowledge")
def build(seed: int = 0) -> Task:
    examples = [Example(f"What is {a} glorp {b}?", glorp(a, b)) for a, b in _pairs(seed)]
    return Task(
        name="glorp_arithmetic",
        train=examples[:170],
        test=examples[170:],
        metric="exact_match",
        max_new_tokens=8,
        family="arithmetic_format",
        description="invented operator: a glorp b = 'larger:smaller', operands 0-99",
        stop=("\n",),
    )


@register_task("glorp_arithmetic_paraphrase", suite="paraphrase")
def build_paraphrase(seed: int = 0) -> Task:
    test = [
        Example(PARAPHRASES[i % len(PARAPHRASES)].format(a=a, b=b), glorp(a, b))
        for i, (a, b) in enumerate(_pairs(seed)[170:])
    ]
    return paraphrase_of(build(seed), test)
