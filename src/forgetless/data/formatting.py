"""Turn examples into token ids: chat template for instruct models, plain text for base models.

Every path (training, log-likelihood scoring, generation) goes through ``PromptFormatter`` so
they see the same tokens, including the special tokens the tokenizer defines (Gemma needs its
``<bos>``: PIQA 0.64 with it, 0.53 without). Training labels cover only the answer tokens
(and the end-of-turn token that closes them); prompt positions get ``-100``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from forgetless.data.task import Example

IGNORE_INDEX = -100
Style = Literal["auto", "chat", "plain"]


@dataclass(frozen=True)
class Encoded:
    """A tokenised training example: ``input_ids`` and ``labels`` of equal length (prompt labels -100)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptFormatter:
    """Formats prompts and answers for one tokenizer.

    Args:
        tokenizer: the model's tokenizer.
        style: ``chat`` (apply the tokenizer's chat template), ``plain`` (prompt text, a space, the
            answer, then EOS), or ``auto`` (chat when the tokenizer has a chat template).
        system_prompt: system message for chat style; None keeps the template's default.
        max_length: prompts are truncated from the left so that prompt + answer fit.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        style: Style = "auto",
        system_prompt: str | None = None,
        max_length: int = 1024,
    ) -> None:
        if style not in ("auto", "chat", "plain"):
            raise ValueError(f"unknown prompt style '{style}'; use auto, chat or plain")
        if style == "chat" and not tokenizer.chat_template:
            raise ValueError("style 'chat' needs a tokenizer with a chat template; use style 'plain'")
        self.tokenizer = tokenizer
        self.style = (
            "chat" if style == "auto" and tokenizer.chat_template else ("plain" if style == "auto" else style)
        )
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.end_ids = self._end_of_answer_ids()

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _end_of_answer_ids(self) -> list[int]:
        """Tokens that close an answer: the chat template's end-of-turn, or EOS for plain text."""
        if self.style == "plain":
            return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        marker = "\u2063forgetless\u2063"
        full = self.tokenizer.apply_chat_template(
            self._messages("x") + [{"role": "assistant", "content": marker}], tokenize=False
        )
        tail = full[full.index(marker) + len(marker) :]
        # keep the end-of-turn special token, drop trailing newlines the template adds after it
        tail_ids = self.tokenizer(tail, add_special_tokens=False).input_ids
        special = set(self.tokenizer.all_special_ids)
        ends = [i for i, token in enumerate(tail_ids) if token in special]
        return tail_ids[: ends[0] + 1] if ends else tail_ids

    def prompt_text(self, prompt: str) -> str:
        """The full text the model sees before the answer."""
        if self.style == "chat":
            return self.tokenizer.apply_chat_template(
                self._messages(prompt), tokenize=False, add_generation_prompt=True
            )
        return prompt

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the prompt with the tokenizer's special tokens (BOS where defined)."""
        if self.style == "chat":
            ids = self.tokenizer.apply_chat_template(
                self._messages(prompt), tokenize=True, add_generation_prompt=True, return_dict=False
            )
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True).input_ids
        return ids

    def template_prefix_length(self) -> int:
        """Leading tokens that every formatted prompt shares (the chat template's system turn and
        user header; 0 for plain style without BOS): what SLIM's prompt pooling skips
        (``AdapterConfig.yield_skip``)."""
        first, second = self.prompt_ids("1 alpha"), self.prompt_ids("2 beta")
        length = 0
        while length < min(len(first), len(second)) and first[length] == second[length]:
            length += 1
        return length

    def template_parts(self) -> tuple[list[int], list[int]]:
        """The fixed token ids every formatted prompt starts and ends with: for chat style the
        system turn and user header, and the end of turn and assistant header; what SLIM's
        sample-level gate leaves out of its pooled distance (``AdapterConfig.template_*_ids``)."""
        first, second = self.prompt_ids("1 alpha"), self.prompt_ids("2 beta")
        head = self.template_prefix_length()
        tail = 0
        while tail < min(len(first), len(second)) - head and first[-1 - tail] == second[-1 - tail]:
            tail += 1
        return first[:head], (first[len(first) - tail :] if tail else [])

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """Token ids of the answer as it continues this prompt (no end-of-turn)."""
        if self.style == "plain" and prompt and not prompt[-1].isspace() and not answer[:1].isspace():
            answer = " " + answer
        return self.tokenizer(answer, add_special_tokens=False).input_ids

    def encode(self, example: Example) -> Encoded:
        """Prompt + answer + end-of-answer tokens; labels only on the answer and its end token."""
        prompt = self.prompt_ids(example.prompt)
        answer = self.answer_ids(example.prompt, example.answer) + self.end_ids
        answer = answer[: self.max_length - 1]
        prompt = prompt[-(self.max_length - len(answer)) :]
        return Encoded(input_ids=prompt + answer, labels=[IGNORE_INDEX] * len(prompt) + answer)
