"""Built-in task suites, offline and deterministic: new-knowledge tasks and the general-ability suite.

Each module registers one or more task builders with ``@register_task``; ``get_task(name)``
builds the task (same seed, same examples), ``SUITES`` groups them:

- ``new_knowledge``: things the base model provably does not know, each learnable in about a
  minute of CPU training (fictional facts, an invented label set, an invented date notation, an
  invented arithmetic operator).
- ``paraphrase``: each new-knowledge task's test items asked in other wording (never trained on).
- ``general``: probes the base model passes before training (world knowledge, arithmetic,
  instruction following, common sense by log-likelihood); a drop after training is forgetting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from forgetless.data.task import Example, Task
from forgetless.errors import InputError
from forgetless.registry import Registry, did_you_mean

TaskBuilder = Callable[[int], Task]
TASKS: Registry[TaskBuilder] = Registry("task", package="forgetless.tasks")
_SUITE_OF: dict[str, str] = {}


def register_task(name: str, suite: str) -> Callable[[TaskBuilder], TaskBuilder]:
    """Register a builder ``seed -> Task`` under ``name`` and put it in ``suite``."""

    def add(builder: TaskBuilder) -> TaskBuilder:
        TASKS.register(name, builder)
        _SUITE_OF[name] = suite
        return builder

    return add


#: one general-suite item in this many is a validation item (the rest are reported)
VALIDATION_EVERY = 3


def general_probe(examples: list[Example], **fields: Any) -> Task:
    """A general-suite task from its items, in their (seeded) order, split by a fixed rule written
    before any result was seen: every third item (positions 2, 5, 8 ...) is a *validation* item,
    the others are *reported*. Settings are chosen on the validation items only
    (``evaluation.split: validation``); tables report the test (reported) items.
    """
    validation = [e for i, e in enumerate(examples) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    reported = [e for i, e in enumerate(examples) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    return Task(train=[], test=reported, validation=validation, kind="general", **fields)


def paraphrase_of(task: Task, test: list[Example]) -> Task:
    """The paraphrase test set of a new-knowledge task: the knowledge of its test items asked in
    wording unlike its training prompts, never trained on (suite ``paraphrase``). A model that
    learned the knowledge answers both; a yielding gate that only recognises the training
    template fails here."""
    return replace(
        task,
        name=f"{task.name}_paraphrase",
        train=[],
        test=test,
        validation=[],
        description=f"{task.name}'s test items, asked in other wording",
    )


def suites() -> dict[str, list[str]]:
    """Suite name -> task names, in registration-independent (sorted) order."""
    TASKS.names()  # discover
    grouped: dict[str, list[str]] = {}
    for name in sorted(_SUITE_OF):
        grouped.setdefault(_SUITE_OF[name], []).append(name)
    return grouped


def get_task(name: str, seed: int = 0) -> Task:
    """Build a built-in task by name (``forgetless tasks`` lists them)."""
    return TASKS.get(name)(seed)


def expand_task_names(names: list[str]) -> list[str]:
    """Task and suite names -> task names (``general`` expands to its probe families)."""
    groups = suites()
    out: list[str] = []
    for name in names:
        if name in groups:
            out.extend(groups[name])
        elif name in TASKS:
            out.append(name)
        else:
            valid = sorted(set(TASKS.names()) | set(groups))
            raise InputError(
                f"unknown task or suite '{name}'.{did_you_mean(name, valid)} Valid names: {', '.join(valid)}"
            )
    return out


__all__ = [
    "TASKS",
    "expand_task_names",
    "general_probe",
    "get_task",
    "paraphrase_of",
    "register_task",
    "suites",
]
