"""Text helpers shared by the scorers: answer normalisation and number extraction."""

from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ASCII_PUNCTUATION = set(string.punctuation)


def _is_punctuation(char: str) -> bool:
    # ASCII symbols such as $ and + are not Unicode category P*, so both tests are needed
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, punctuation and articles removed, spaces collapsed.

    Punctuation becomes a space (not nothing) so that "Paris,France" still splits into two words.
    """
    text = "".join(" " if _is_punctuation(char) else char for char in text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The first non-empty line of a reply (models often add an explanation below the answer)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM8K_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def parse_number(token: str) -> float | None:
    """'1,234.50' -> 1234.5; None for text that is not a number."""
    cleaned = token.replace(",", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The answer number of a reply or reference: after GSM8K's ``#### N`` if present, else the last number."""
    marked = _GSM8K_FINAL.findall(text)
    if marked:
        return parse_number(marked[-1])
    numbers = _NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None
