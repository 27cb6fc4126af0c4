"""``accuracy``: the reply's first line equals the label (normalised), for classification tasks.

For multiple-choice examples scored by generation, the label is the gold choice's text. A label
that goes on after its first line (TRACE ScienceQA: the letter, then an explanation) is judged on
that first line, as TRACE scores it: the answer is the letter.
"""

from __future__ import annotations

from forgetless.data.task import Example
from forgetless.evaluation.scorers import register_scorer
from forgetless.evaluation.scorers._text import first_line, normalize


@register_scorer("accuracy")
def accuracy(prediction: str, example: Example) -> float:
    """The reply's first line equals the label's first line after normalisation."""
    label = example.choices[example.gold] if example.choices is not None else example.answer
    return float(normalize(first_line(prediction)) == normalize(first_line(label)))
