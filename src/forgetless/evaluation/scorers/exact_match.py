"""``exact_match``: the normalised reply equals the normalised reference (SQuAD normalisation)."""

from __future__ import annotations

from forgetless.data.task import Example
from forgetless.evaluation.scorers import register_scorer
from forgetless.evaluation.scorers._text import normalize


@register_scorer("exact_match")
def exact_match(prediction: str, example: Example) -> float:
    """The reply equals the reference after normalisation (case, punctuation, articles, spaces)."""
    return float(normalize(prediction) == normalize(example.answer))
