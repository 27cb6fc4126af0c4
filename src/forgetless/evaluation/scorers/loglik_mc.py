"""``loglik_mc``: multiple choice by log-likelihood, scored exactly as lm-eval harness scores it.

Each choice's log-likelihood is the summed log-probability of its tokens as the continuation of
the prompt. With ``argmax`` taking the first index on ties (as ``numpy.argmax`` does):

- ``acc``: argmax of the log-likelihoods is the gold index (the task's score);
- ``acc_norm``: argmax of log-likelihood / number of characters of the choice (lm-eval's
  ``acc_norm``: ``len(choice)``, the text without the leading space);
- ``acc_bytes``: the same divided by the UTF-8 byte length (lm-eval's ``acc_bytes``).
"""

from __future__ import annotations

from collections.abc import Sequence

from forgetless.data.task import Example
from forgetless.evaluation.scorers import register_scorer


def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (``numpy.argmax`` semantics)."""
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


@register_scorer("loglik_mc", kind="loglik", primary="acc")
def loglik_mc(loglikelihoods: list[float], example: Example) -> dict[str, float]:
    """Multiple choice by summed choice log-likelihood: lm-eval's acc, acc_norm and acc_bytes."""
    if example.choices is None or len(loglikelihoods) != len(example.choices):
        raise ValueError("loglik_mc needs one log-likelihood per choice of a multiple-choice example")
    chars = [max(len(choice), 1) for choice in example.choices]
    nbytes = [max(len(choice.encode("utf-8")), 1) for choice in example.choices]
    return {
        "acc": float(first_argmax(loglikelihoods) == example.gold),
        "acc_norm": float(first_argmax([ll / n for ll, n in zip(loglikelihoods, chars)]) == example.gold),
        "acc_bytes": float(first_argmax([ll / n for ll, n in zip(loglikelihoods, nbytes)]) == example.gold),
    }
