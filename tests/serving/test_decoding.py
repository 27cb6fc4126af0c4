"""The worker's per-row pieces on hand-made inputs: streamed text never takes anything back, top-p
keeps the nucleus, log-probabilities sit in OpenAI's legacy layout."""

from __future__ import annotations

import math

import pytest
import torch

from forgetless.serving.decoding import ReplyText, Sampling, logprobs_of, prompt_logprobs, sample_token

PIECES = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "\n\n", 6: "Q:", 7: "\ufffd"}


def _decode(ids):
    return "".join(PIECES[i] for i in ids)


def test_streamed_text_holds_back_what_could_start_a_stop_string():
    reply = ReplyText(_decode, stop=["\n\nQ:"])
    sent = [reply.add(token) for token in (1, 2, 3, 4)]
    assert sent == ["Hel", "lo", " wo", "rld"] and not reply.stopped
    assert reply.add(5) == ""  # "\n\n" may be the start of "\n\nQ:": held back
    assert reply.add(6) == "" and reply.stopped  # it was: cut, never sent
    assert reply.text == "Hello world" and reply.flush() == ""


def test_held_back_text_is_sent_once_it_cannot_be_a_stop_string():
    reply = ReplyText(_decode, stop=["\n\nQ:"])
    assert [reply.add(t) for t in (1, 5)] == ["Hel", ""]
    assert reply.add(2) == "\n\nlo" and not reply.stopped
    assert reply.flush() == "" and reply.sent == reply.text == "Hel\n\nlo"


def test_an_incomplete_character_waits_for_its_next_token():
    reply = ReplyText(_decode, stop=[])
    assert reply.add(1) == "Hel"
    assert reply.add(7) == ""  # a replacement character: bytes of a character still to come
    assert reply.flush() == "\ufffd"  # at the end it is what the reply holds


def test_top_p_draws_only_from_the_nucleus():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two (mass before the third is 0.8)
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    generator = torch.Generator().manual_seed(0)
    nucleus = Sampling(max_tokens=1, temperature=1.0, top_p=0.6)
    draws = {sample_token(logits, nucleus, generator) for _ in range(200)}
    assert draws == {0, 1}
    greedy_like = Sampling(max_tokens=1, temperature=1.0, top_p=1e-6)
    assert {sample_token(logits, greedy_like, generator) for _ in range(20)} == {0}


def test_a_seed_gives_the_same_draws():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    sampling = Sampling(max_tokens=1, temperature=1.0, seed=7)
    draws = [
        [sample_token(logits, sampling, g) for _ in range(10)]
        for g in (sampling.generator(torch.device("cpu")) for _ in range(2))
    ]
    assert draws[0] == draws[1]
    assert Sampling(max_tokens=1).generator(torch.device("cpu")) is None  # greedy: no generator


def test_prompt_logprobs_read_the_columns_of_a_left_padded_row():
    # 2 pad columns, then a 3-token prompt [4, 1, 2]; column t predicts the token at t + 1
    logits = torch.zeros(5, 6)
    logits[2, 1] = math.log(3.0)  # after token 4: token 1 has weight 3 of 8
    logits[3, 2] = math.log(5.0)  # after token 1: token 2 has weight 5 of 10
    scored = prompt_logprobs(logits, [4, 1, 2], top=1, token_text=str)
    assert scored.token_ids == [4, 1, 2]
    assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
    assert scored.token_logprobs[1:] == pytest.approx([math.log(3 / 8), math.log(5 / 10)], abs=1e-6)
    assert [list(top) for top in scored.top_logprobs[1:]] == [["1"], ["2"]]
    assert scored.top_logprobs[1]["1"] == scored.token_logprobs[1]  # the same number, as lm-eval compares
    layout = scored.to_openai(lambda token: "ab" if token == 4 else "c", offset=1)
    assert layout["tokens"] == ["ab", "c", "c"] and layout["text_offset"] == [1, 3, 4]


def test_logprobs_of_without_alternatives():
    scored = logprobs_of(torch.zeros(2, 4), [1, 3], top=0, token_text=str)
    assert scored.token_logprobs == pytest.approx([math.log(0.25)] * 2) and scored.top_logprobs == [{}, {}]
