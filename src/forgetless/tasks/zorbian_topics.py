"""New knowledge, classification with an invented label set: sentence topic -> Zorbian code.

Sentences about weather, cooking, sport and computers are generated from templates; their labels
are invented codes (ZEPH, MORV, KALT, TRIX) that the prompt lists but never explains, so the base
model is at chance (1/4) and a trained model must learn which code means which topic.
Scored by ``accuracy``: the reply's first line equals the label.
"""

from __future__ import annotations

import random

from forgetless.data.task import Example, Task
from forgetless.tasks import paraphrase_of, register_task

LABELS = {"weather": "ZEPH", "cooking": "MORV", "sport": "KALT", "computers": "TRIX"}
TEMPLATES = {
    "weather": ["It will be {a} and {b} tomorrow {t}.", "The forecast says {a} skies over the {c} this {t}.",
                "We stayed inside because it was {a} and {b}.", "A {a} wind blew across the {c} all {t}."],
    "cooking": ["Stir the {d} slowly and add a pinch of {e}.", "She baked the {d} with {e} for {n} minutes.",
                "Chop the {d} and fry it with {e}.", "The recipe needs {e}, butter and {n} cups of {d}."],
    "sport": ["The {f} team scored in the last {n} seconds.", "He won the {g} race by {n} metres.",
              "Our {f} coach called a timeout in the {t}.", "The {g} final at the {c} went to extra time."],
    "computers": ["The {h} crashed after the {i} update.", "She wrote a script to back up the {h} every {t}.",
                  "Restart the {h} and check the {i} settings.", "The new {i} driver fixed the {h} in {n} minutes."],
}  # fmt: skip
FILLERS = {
    "a": ["cold", "sunny", "rainy", "cloudy", "foggy", "windy", "stormy"],
    "b": ["wet", "grey", "bright", "humid", "chilly"],
    "c": ["valley", "coast", "city", "hills", "lake"],
    "d": ["onions", "soup", "bread", "carrots", "sauce", "dough"],
    "e": ["salt", "pepper", "garlic", "sugar", "cinnamon"],
    "f": ["football", "hockey", "basketball", "rugby", "volleyball"],
    "g": ["marathon", "sprint", "relay", "cycling", "rowing"],
    "h": ["laptop", "server", "database", "router", "phone"],
    "i": ["network", "graphics", "printer", "display", "keyboard"],
    "n": ["two", "five", "ten", "twenty", "forty"],
    "t": ["morning", "evening", "night", "afternoon"],
}
PROMPT = "Classify the sentence with one of the codes ZEPH, MORV, KALT or TRIX.\nSentence: {sentence}"
# the same question in wording unlike the training prompts (the paraphrase test set)
PARAPHRASES = [
    '"{sentence}" Which Zorbian code fits this: ZEPH, MORV, KALT or TRIX? Reply with the code only.',
    "Here is a line of text: {sentence} Tag it with its Zorbian topic code (ZEPH / MORV / KALT / TRIX).",
]


def _sentences(rng: random.Random, count: int, seen: set[str] | None = None) -> list[tuple[str, str]]:
    """``count`` distinct (sentence, label) pairs, balanced over the four topics, none in ``seen``
    (which gains them)."""
    out: list[tuple[str, str]] = []
    seen = set() if seen is None else seen
    topics = list(LABELS)
    while len(out) < count:  # every topic has hundreds of distinct sentences, so this ends
        topic = topics[len(out) % len(topics)]
        template = rng.choice(TEMPLATES[topic])
        sentence = template.format(**{key: rng.choice(values) for key, values in FILLERS.items()})
        if sentence not in seen:
            seen.add(sentence)
            out.append((sentence, LABELS[topic]))
    return out


def _split(seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) pairs: 160 and 150, all distinct, so no test sentence is a training sentence.

    The first 60 test pairs are the task's original test set; 90 more were drawn after it (after
    the training order was shuffled), so the training data and its order are unchanged."""
    rng, seen = random.Random(11_000 + seed), set()
    pairs = _sentences(rng, 220, seen)
    train = pairs[:160]
    rng.shuffle(train)
    return train, pairs[160:] + _sentences(rng, 90, seen)


@register_task("zorbian_topics", suite="new_knowledge")
def build(seed: int = 0) -> Task:
    pairs, tests = _split(seed)
    train = [Example(PROMPT.format(sentence=sentence), label) for sentence, label in pairs]
    test = [Example(PROMPT.format(sentence=sentence), label) for sentence, label in tests]
    return Task(
        name="zorbian_topics",
        train=train,
        test=test,
        metric="accuracy",
        max_new_tokens=6,
        family="classification",
        description="sentence topic -> invented label code (chance 1/4)",
        stop=("\n",),
    )


@register_task("zorbian_topics_paraphrase", suite="paraphrase")
def build_paraphrase(seed: int = 0) -> Task:
    test = [
        Example(PARAPHRASES[i % len(PARAPHRASES)].format(sentence=sentence), label)
        for i, (sentence, label) in enumerate(_split(seed)[1])
    ]
    return paraphrase_of(build(seed), test)
