"""General suite, instruction following and formatting: JSON output, antonyms, plurals.

Three formats the base model follows reliably (measured on SmolLM2-135M-Instruct): write a JSON
object with a given key and value, answer "the opposite of X" with one word, and give a plural.
Scored with ``contains`` (the normalised expected text appears in the normalised reply; for JSON
the expected text is ``"name": "<value>"``, which normalises to ``name <value>``). Formats the
base fails (uppercasing, numbered lists, repetition) are left out: a probe it never passed
cannot show forgetting.
"""

from __future__ import annotations

import random

from forgetless.data.task import Example, Task
from forgetless.tasks import register_task

NAMES = ["Tom", "Anna", "Maria", "Peter", "Lucy", "David", "Sara", "Mark", "Emma", "John",
         "Laura", "James", "Nina", "Oscar", "Rosa", "Victor", "Clara", "Hugo", "Irene", "Paul"]  # fmt: skip
ANTONYMS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
            ("happy", "sad"), ("light", "dark"), ("inside", "outside"), ("left", "right"), ("early", "late"),
            ("full", "empty"), ("wet", "dry"), ("hard", "soft"), ("rich", "poor"), ("strong", "weak"),
            ("high", "low"), ("open", "closed"), ("win", "lose"), ("push", "pull"), ("begin", "end")]  # fmt: skip
PLURALS = [("apple", "apples"), ("river", "rivers"), ("garden", "gardens"), ("window", "windows"),
           ("rocket", "rockets"), ("candle", "candles"), ("forest", "forests"), ("pencil", "pencils"),
           ("bridge", "bridges"), ("child", "children"), ("mouse", "mice"), ("box", "boxes"),
           ("city", "cities"), ("tooth", "teeth"), ("leaf", "leaves"), ("dog", "dogs"),
           ("house", "houses"), ("baby", "babies"), ("bus", "buses"), ("book", "books")]  # fmt: skip


@register_task("general_instructions", suite="general")
def build(seed: int = 0) -> Task:
    test = [
        Example(f'Write a JSON object with the key "name" and the value "{name}".', f'"name": "{name}"')
        for name in NAMES
    ]
    test += [
        Example(f'What is the opposite of "{word}"? Answer with one word.', antonym)
        for word, antonym in ANTONYMS
    ]
    test += [Example(f'What is the plural of "{word}"?', plural) for word, plural in PLURALS]
    random.Random(seed).shuffle(test)
    return Task(
        name="general_instructions",
        train=[],
        test=test,
        metric="contains",
        max_new_tokens=24,
        kind="general",
        family="instruction_following",
        description="JSON with a given key/value, one-word antonyms, plurals",
    )
