"""Deterministic invented words (people, cities) that no pretrained model has seen as entities."""

from __future__ import annotations

import random

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "pr", "tr", "st", "th", "qu", "sh", "vr"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ia"]
_CODAS = ["", "", "n", "r", "l", "s", "x", "th", "nd", "rk"]


def invented_word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return word.capitalize()


def invented_words(seed: int, count: int, syllables: tuple[int, ...] = (2, 3)) -> list[str]:
    """``count`` distinct invented capitalised words, the same for the same seed."""
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = invented_word(rng, rng.choice(syllables))
        if word not in seen and 4 <= len(word) <= 12:
            seen.add(word)
            words.append(word)
    return words
