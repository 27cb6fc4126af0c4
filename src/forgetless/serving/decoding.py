"""What the worker does per row of a batch, apart from the forward passes: pick the next token
(greedy, or temperature + nucleus sampling with a per-request seed), measure log-probabilities in
OpenAI's legacy ``logprobs`` layout, and turn arriving tokens into text that is safe to stream.

Greedy rows take the argmax of the same logits ``generate_greedy`` takes, so their tokens equal
evaluation's. Sampling rows draw from their own ``torch.Generator``, so a request with a ``seed``
gets the same reply whichever requests share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from forgetless.evaluation.inference import cut_at_stop


@dataclass(frozen=True)
class Sampling:
    """How one request decodes.

    Attributes:
        max_tokens: new tokens at most (0: none, e.g. to score a prompt with ``echo``).
        temperature: 0 is greedy; above 0 the logits are divided by it and sampled.
        top_p: nucleus sampling: draw from the smallest set of tokens whose probability reaches it.
        seed: seed of the request's own generator (None: a random one).
        stop: strings that end the reply (cut from the text).
        logprobs: alternatives per token to report (None: no log-probabilities).
        echo: report the prompt (and its log-probabilities when ``logprobs`` is set) before the reply.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    echo: bool = False

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's random generator (None for greedy requests)."""
        if self.temperature == 0:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def sample_token(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from (V,) logits at ``sampling.temperature``, within the ``top_p`` nucleus."""
    probabilities = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(descending=True)
        # keep a token while the mass before it is below top_p (the most likely token always stays)
        outside = sorted_probabilities.cumsum(-1) - sorted_probabilities >= sampling.top_p
        sorted_probabilities = sorted_probabilities.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probabilities, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probabilities, 1, generator=generator))


def choose_tokens(
    logits: Tensor, samplings: Sequence[Sampling], generators: Sequence[torch.Generator | None]
) -> Tensor:
    """(B, V) logits -> (B,) next tokens: the argmax for greedy rows, a draw for the others."""
    tokens = logits.argmax(-1)
    for row, (sampling, generator) in enumerate(zip(samplings, generators)):
        if generator is not None:
            tokens[row] = sample_token(logits[row], sampling, generator)
    return tokens


@dataclass
class TokenLogprobs:
    """Log-probabilities of chosen tokens in OpenAI's legacy layout (parallel lists).

    ``token_logprobs`` is None for a prompt's first token (nothing predicts it); ``top_logprobs``
    maps the text of each of the ``k`` likeliest tokens at that position to its log-probability.
    """

    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)

    def extend(self, other: TokenLogprobs) -> None:
        self.token_ids += other.token_ids
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs

    def to_openai(self, token_text: Callable[[int], str], offset: int = 0) -> dict:
        """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; ``text_offset`` counts
        characters from ``offset`` as the sum of the tokens' own texts (exact unless a character
        is split over tokens, as some byte-level tokens split emoji)."""
        tokens = [token_text(token) for token in self.token_ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": offsets,
        }


def logprobs_of(
    logits: Tensor, targets: Sequence[int], top: int, token_text: Callable[[int], str]
) -> TokenLogprobs:
    """(N, V) logits, each predicting one of ``targets`` (N ids) -> their log-probabilities and the
    ``top`` likeliest alternatives at each position."""
    result = TokenLogprobs(token_ids=list(targets))
    if not targets:
        return result
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(targets), device=logprobs.device)
    result.token_logprobs = logprobs.gather(1, index[:, None]).squeeze(1).tolist()
    if top > 0:
        values, ids = logprobs.topk(top, dim=-1)
        for row_values, row_ids in zip(values.tolist(), ids.tolist()):
            result.top_logprobs.append({token_text(t): v for t, v in zip(row_ids, row_values)})
    else:
        result.top_logprobs = [{} for _ in targets]
    return result


def prompt_logprobs(
    prompt_logits: Tensor, prompt: Sequence[int], top: int, token_text: Callable[[int], str]
) -> TokenLogprobs:
    """Log-probabilities of a prompt's tokens from its left-padded prefill logits (T, V): column
    ``T - L + i - 1`` predicts token ``i`` of an ``L``-token prompt; the first token gets None."""
    width = prompt_logits.shape[0]
    start = width - len(prompt)
    predicted = logprobs_of(prompt_logits[start : width - 1], prompt[1:], top, token_text)
    first = TokenLogprobs([prompt[0]], [None], [None])
    first.extend(predicted)
    return first


def _held_back(text: str, stop: Sequence[str]) -> str:
    """``text`` without what may still change: a trailing replacement character (a character whose
    bytes are not all decoded yet) and a tail that could be the start of a stop string."""
    text = text.rstrip("\ufffd")
    longest = 0
    for string in stop:
        for length in range(min(len(string) - 1, len(text)), longest, -1):
            if text.endswith(string[:length]):
                longest = length
                break
    return text[: len(text) - longest]


class ReplyText:
    """The text of a reply as its tokens arrive.

    ``add`` returns the new text that can be sent without ever taking it back, and notes whether
    a stop string ended the reply; ``text`` is the reply cut at its first stop string. Text is
    decoded from all tokens each time (a token's text can depend on its neighbours).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str]) -> None:
        self.decode, self.stop = decode, tuple(stop)
        self.token_ids: list[int] = []
        self.sent = ""
        self.stopped = False

    @property
    def text(self) -> str:
        return cut_at_stop(self.decode(self.token_ids), self.stop)[0]

    def add(self, token: int) -> str:
        self.token_ids.append(token)
        text, self.stopped = cut_at_stop(self.decode(self.token_ids), self.stop)
        return self._advance(text if self.stopped else _held_back(text, self.stop))

    def flush(self) -> str:
        """What is left to send once the reply has ended."""
        return self._advance(self.text)

    def _advance(self, ready: str) -> str:
        if not ready.startswith(self.sent):
            return ""  # decoding changed text already sent: send nothing until it agrees again
        delta, self.sent = ready[len(self.sent) :], ready
        return delta
