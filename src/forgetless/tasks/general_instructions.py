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
from forgetless.tasks import general_probe, register_task

NAMES = ["Tom", "Anna", "Maria", "Peter", "Lucy", "David", "Sara", "Mark", "Emma", "John",
         "Laura", "James", "Nina", "Oscar", "Rosa", "Victor", "Clara", "Hugo", "Irene", "Paul"]  # fmt: skip
CITIES = ["Paris", "London", "Tokyo", "Madrid", "Berlin", "Rome", "Cairo", "Lima", "Oslo", "Dublin",
          "Vienna", "Prague", "Lisbon", "Athens", "Warsaw", "Moscow", "Seoul", "Delhi", "Sydney", "Toronto"]  # fmt: skip
ANTONYMS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
            ("happy", "sad"), ("light", "dark"), ("inside", "outside"), ("left", "right"), ("early", "late"),
            ("full", "empty"), ("wet", "dry"), ("hard", "soft"), ("rich", "poor"), ("strong", "weak"),
            ("high", "low"), ("open", "closed"), ("win", "lose"), ("push", "pull"), ("begin", "end"),
            ("old", "new"), ("long", "short"), ("thick", "thin"), ("heavy", "light"), ("clean", "dirty"),
            ("loud", "quiet"), ("young", "old"), ("good", "bad"), ("first", "last"), ("north", "south"),
            ("east", "west"), ("true", "false"), ("yes", "no"), ("love", "hate"), ("sweet", "sour"),
            ("buy", "sell"), ("give", "take"), ("come", "go"), ("question", "answer"), ("friend", "enemy")]  # fmt: skip
PLURALS = [("apple", "apples"), ("river", "rivers"), ("garden", "gardens"), ("window", "windows"),
           ("rocket", "rockets"), ("candle", "candles"), ("forest", "forests"), ("pencil", "pencils"),
           ("bridge", "bridges"), ("child", "children"), ("mouse", "mice"), ("box", "boxes"),
           ("city", "cities"), ("tooth", "teeth"), ("leaf", "leaves"), ("dog", "dogs"),
           ("house", "houses"), ("baby", "babies"), ("bus", "buses"), ("book", "books"),
           ("cat", "cats"), ("car", "cars"), ("tree", "trees"), ("bird", "birds"), ("chair", "chairs"),
           ("table", "tables"), ("flower", "flowers"), ("star", "stars"), ("horse", "horses"),
           ("boat", "boats"), ("woman", "women"), ("man", "men"), ("foot", "feet"), ("goose", "geese"),
           ("knife", "knives"), ("story", "stories"), ("glass", "glasses"), ("watch", "watches"),
           ("potato", "potatoes"), ("lady", "ladies")]  # fmt: skip


@register_task("general_instructions", suite="general")
def build(seed: int = 0) -> Task:
    items = [
        Example(f'Write a JSON object with the key "name" and the value "{name}".', f'"name": "{name}"')
        for name in NAMES
    ]
    items += [
        Example(f'Write a JSON object with the key "city" and the value "{city}".', f'"city": "{city}"')
        for city in CITIES
    ]
    items += [
        Example(f'What is the opposite of "{word}"? Answer with one word.', antonym)
        for word, antonym in ANTONYMS
    ]
    items += [Example(f'What is the plural of "{word}"?', plural) for word, plural in PLURALS]
    random.Random(seed).shuffle(items)
    return general_probe(
        items,
        name="general_instructions",
        metric="contains",
        max_new_tokens=24,
        family="instruction_following",
        description="JSON with a given key/value, one-word antonyms, plurals",
    )
