"""``Task`` and ``Example``: what every other part of forgetless trains and evaluates on.

A task is a name, train/test (and optional validation) examples, and how to score them. An example
is a prompt and its answer; multiple-choice examples also carry the choices and the gold index, so
the same task can be scored by generation (exact answer) or by log-likelihood over the choices.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Example:
    """One prompt / answer pair.

    Attributes:
        prompt: the user turn (chat models) or the text before the answer (base models).
        answer: the reference answer; the training loss covers only its tokens.
        choices: for multiple choice, the candidate continuations (``answer`` is one of them).
        gold: index of the correct choice.
    """

    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    gold: int | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if self.gold is None or not 0 <= self.gold < len(self.choices):
                raise ValueError(f"gold index {self.gold} is out of range for {len(self.choices)} choices")


@dataclass
class Task:
    """A named dataset with splits and a scoring rule.

    Attributes:
        name: registry / report name.
        train, test, validation: the splits (validation may be empty).
        metric: scorer name (``exact_match``, ``accuracy``, ``loglik_mc`` ...; evaluation registry).
        max_new_tokens: generation budget when scored by generation.
        kind: ``new_knowledge`` (taught by training) or ``general`` (must survive training).
        family: probe family inside a suite (``capitals``, ``arithmetic`` ...), for reports.
        description: one line for ``forgetless tasks``.
        system_prompt: system message for chat models (None: the template's default).
        stop: strings that end a generated answer (the text from the first one on is dropped).
        max_prompt_tokens: evaluation keeps at most this many prompt tokens (the oldest are cut,
            BOS kept), as training's ``max_length`` cuts them; None: the model's context length.
    """

    name: str
    train: list[Example]
    test: list[Example]
    validation: list[Example] = field(default_factory=list)
    metric: str = "exact_match"
    max_new_tokens: int = 32
    kind: str = "new_knowledge"
    family: str = ""
    description: str = ""
    system_prompt: str | None = None
    stop: tuple[str, ...] = ()
    max_prompt_tokens: int | None = None

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.test) and all(example.choices is not None for example in self.test)

    def limited(self, train: int | None = None, test: int | None = None, seed: int = 0) -> Task:
        """A copy with at most ``train`` / ``test`` examples, sampled without replacement by ``seed``."""

        def take(examples: list[Example], limit: int | None) -> list[Example]:
            if limit is None or limit >= len(examples):
                return list(examples)
            picked = sorted(random.Random(seed).sample(range(len(examples)), limit))
            return [examples[i] for i in picked]

        return replace(self, train=take(self.train, train), test=take(self.test, test))

    def split_validation(self, fraction: float = 0.1, seed: int = 0) -> Task:
        """Carve a validation split out of ``train`` (for choosing hyper-parameters, never the test set)."""
        order = list(range(len(self.train)))
        random.Random(seed).shuffle(order)
        count = max(1, int(round(len(order) * fraction))) if self.train else 0
        held = set(order[:count])
        return replace(
            self,
            train=[e for i, e in enumerate(self.train) if i not in held],
            validation=[e for i, e in enumerate(self.train) if i in held],
        )

    def fingerprint(self) -> str:
        """A content hash of the task (splits + scoring), used to key cached results."""
        digest = hashlib.sha256()
        header = [self.name, self.metric, self.max_new_tokens, self.system_prompt, list(self.stop)]
        if self.max_prompt_tokens is not None:  # only when set: older fingerprints stay valid
            header.append(self.max_prompt_tokens)
        digest.update(json.dumps(header).encode())
        for split in (self.train, self.validation, self.test):
            digest.update(b"|split|")
            for example in split:
                digest.update(
                    json.dumps([example.prompt, example.answer, example.choices, example.gold]).encode()
                )
        return digest.hexdigest()[:16]

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "metric": self.metric,
            "description": self.description,
        }
