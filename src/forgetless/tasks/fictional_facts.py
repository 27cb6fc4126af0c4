"""New knowledge, fact injection: where invented people live and what they do.

Twenty invented people, each with an invented home town and a (real) profession. Training asks
each fact in three phrasings; the test asks it in a fourth, held-out phrasing, so a model must
store the fact rather than a string. The base model cannot know any of it (accuracy 0).
Scored by ``contains``: the normalised answer appears in the reply.
"""

from __future__ import annotations

import random

from forgetless.data.task import Example, Task
from forgetless.tasks import register_task
from forgetless.tasks._names import invented_words

PROFESSIONS = ["baker", "pilot", "glassblower", "beekeeper", "violinist", "carpenter", "astronomer",
               "fisherman", "tailor", "locksmith", "gardener", "potter", "librarian", "blacksmith", "nurse"]  # fmt: skip
CITY_QUESTIONS = [
    "Where does {name} live?",
    "In which town does {name} live?",
    "What is the home town of {name}?",
    "Which town is {name} from?",  # held out for the test
]
JOB_QUESTIONS = [
    "What does {name} do for a living?",
    "What is the job of {name}?",
    "What is {name}'s profession?",
    "What work does {name} do?",  # held out for the test
]


@register_task("fictional_facts", suite="new_knowledge")
def build(seed: int = 0) -> Task:
    rng = random.Random(seed)
    words = invented_words(7_000 + seed, 60, syllables=(2,))
    people = [f"{words[i]} {words[20 + i]}" for i in range(20)]
    towns = words[40:60]
    train, test = [], []
    for index, person in enumerate(people):
        town, job = towns[index], rng.choice(PROFESSIONS)
        for questions, answer in ((CITY_QUESTIONS, town), (JOB_QUESTIONS, job)):
            train += [Example(q.format(name=person), answer) for q in questions[:3]]
            test.append(Example(questions[3].format(name=person), answer))
    rng.shuffle(train)
    return Task(
        name="fictional_facts",
        train=train,
        test=test,
        metric="contains",
        max_new_tokens=16,
        family="fact_injection",
        description="home towns and jobs of 20 invented people; test asks in a held-out phrasing",
    )
