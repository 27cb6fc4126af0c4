"""``contains``: the normalised reference appears, as whole words, in the normalised reply.

"The capital of France is Paris." contains "Paris"; "Parisian" does not (word boundaries), so a
reply cannot score by producing a longer word that happens to start with the answer.
"""

from __future__ import annotations

from forgetless.data.task import Example
from forgetless.evaluation.scorers import register_scorer
from forgetless.evaluation.scorers._text import normalize


@register_scorer("contains")
def contains(prediction: str, example: Example) -> float:
    """The normalised reference appears as whole words in the normalised reply."""
    reference = normalize(example.answer)
    if not reference:
        return 0.0
    return float(f" {reference} " in f" {normalize(prediction)} ")
