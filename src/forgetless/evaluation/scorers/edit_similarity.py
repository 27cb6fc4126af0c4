"""``edit_similarity``: normalised Indel similarity (``rapidfuzz.fuzz.ratio`` / 100), as TRACE scores Py150 code.

1.0 for identical strings, 0.0 for nothing in common; leading/trailing whitespace is ignored.
"""

from __future__ import annotations

from forgetless.data.task import Example
from forgetless.evaluation.scorers import register_scorer


@register_scorer("edit_similarity")
def edit_similarity(prediction: str, example: Example) -> float:
    """Edit similarity of reply and reference: rapidfuzz fuzz.ratio / 100."""
    from rapidfuzz import fuzz

    return float(fuzz.ratio(prediction.strip(), example.answer.strip()) / 100.0)
