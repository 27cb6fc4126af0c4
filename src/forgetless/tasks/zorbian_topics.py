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


def _sentences(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` distinct (sentence, label) pairs, balanced over the four topics."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    topics = list(LABELS)
    while len(out) < count:  # every topic has hundreds of distinct sentences, so this ends
        topic = topics[len(out) % len(topics)]
        template = rng.choice(TEMPLATES[topic])
        sentence = template.format(**{key: rng.choice(values) for key, values in FILLERS.items()})
        if sentence not in seen:
            seen.add(sentence)
            out.append((sentence, LABELS[topic]))
    return out


@register_task("zorbian_topics", suite="new_knowledge")
def build(seed: int = 0) -> Task:
    rng = random.Random(11_000 + seed)
    pairs = _sentences(rng, 220)  # distinct, so no test sentence is a training sentence
    train = [Example(PROMPT.format(sentence=sentence), label) for sentence, label in pairs[:160]]
    test = [Example(PROMPT.format(sentence=sentence), label) for sentence, label in pairs[160:]]
    rng.shuffle(train)
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
    pairs = _sentences(random.Random(11_000 + seed), 220)[160:]
    test = [
        Example(PARAPHRASES[i % len(PARAPHRASES)].format(sentence=sentence), label)
        for i, (sentence, label) in enumerate(pairs)
    ]
    return paraphrase_of(build(seed), test)
