"""``final_number``: the reply's answer number equals the reference's (GSM8K style).

The number is the one after ``####`` when present (GSM8K references and trained replies), else the
last number in the text ("... so she has 18 eggs." -> 18). Commas are thousands separators.
"""

from __future__ import annotations

import math

from forgetless.data.task import Example
from forgetless.evaluation.scorers import register_scorer
from forgetless.evaluation.scorers._text import final_number


@register_scorer("final_number")
def final_number_match(prediction: str, example: Example) -> float:
    """The reply's final number (after '####', else the last one) equals the reference's."""
    expected, produced = final_number(example.answer), final_number(prediction)
    if expected is None or produced is None:
        return 0.0
    return float(math.isclose(expected, produced, rel_tol=1e-9, abs_tol=1e-9))
