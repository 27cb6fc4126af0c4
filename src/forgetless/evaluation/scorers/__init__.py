"""Scorers: how one model output is judged against an example, registered by name.

A task names its scorer in ``Task.metric``. There are two kinds:

- ``generation`` scorers judge a greedy reply: ``score(prediction, example) -> float`` in [0, 1]
  (exact match, contains, accuracy, final number, ROUGE-L, SARI, edit similarity).
- ``loglik`` scorers judge the summed log-probabilities of a multiple-choice example's choices:
  ``score(loglikelihoods, example) -> {measure: float}`` (``loglik_mc``: lm-eval's acc/acc_norm).

A task's score is the mean of its examples' primary measure. One module per scorer, each registers
itself with ``@register_scorer``; ``SCORERS`` discovers them (no hand-kept list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from forgetless.data.task import Example
from forgetless.registry import Registry

GenerationScore = Callable[[str, Example], float]
LoglikScore = Callable[[list[float], Example], dict[str, float]]


@dataclass(frozen=True)
class Scorer:
    """One registered scorer.

    Attributes:
        name: registry name (what ``Task.metric`` holds).
        kind: ``generation`` (judges a reply) or ``loglik`` (judges choice log-likelihoods).
        score: the per-example function (see the module docstring for its two signatures).
        primary: for ``loglik`` scorers, the measure that becomes the task's score.
        description: one line for listings.
    """

    name: str
    kind: Literal["generation", "loglik"]
    score: Callable
    primary: str = "score"
    description: str = ""


SCORERS: Registry[Scorer] = Registry("scorer", package="forgetless.evaluation.scorers")


def register_scorer(
    name: str, kind: Literal["generation", "loglik"] = "generation", primary: str = "score"
) -> Callable[[Callable], Callable]:
    """Register the decorated per-example function as scorer ``name`` (its docstring's first line describes it)."""

    def add(func: Callable) -> Callable:
        description = (func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else ""
        SCORERS.register(name, Scorer(name, kind, func, primary, description))
        return func

    return add


def get_scorer(name: str) -> Scorer:
    """The scorer called ``name``; ``UnknownNameError`` with the valid names otherwise."""
    return SCORERS.get(name)


__all__ = ["SCORERS", "Scorer", "get_scorer", "register_scorer"]
