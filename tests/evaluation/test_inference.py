"""Batched inference equals one-by-one, uncached inference on every model family we evaluate."""

from __future__ import annotations

import pytest
import torch

from forgetless import load_model
from forgetless.evaluation.inference import choice_loglikelihoods, generate_greedy

TEXTS = ["Hello there, how are you doing today my friend?", "Hi", "The capital of France is a city that"]


def _prompts(tokenizer):
    return [tokenizer(text).input_ids for text in TEXTS]


def _decode(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _hf_greedy(model, prompt, steps, pad_id):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=pad_id)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_batched_generation_equals_hf_greedy(spec):
    model, tokenizer = load_model(spec)
    prompts = _prompts(tokenizer)
    batched = generate_greedy(
        model, prompts, _decode(tokenizer), max_new_tokens=8, pad_id=tokenizer.pad_token_id
    )
    reference = [_hf_greedy(model, p, 8, tokenizer.pad_token_id) for p in prompts]
    assert [list(g.token_ids) for g in batched] == reference
    assert all(len(g.token_ids) == 8 for g in batched)


def test_generation_on_moe_model(tiny_mixtral, tokenizer):
    prompts = _prompts(tokenizer)
    batched = generate_greedy(
        tiny_mixtral, prompts, _decode(tokenizer), max_new_tokens=6, pad_id=tokenizer.pad_token_id
    )
    reference = [_hf_greedy(tiny_mixtral, p, 6, tokenizer.pad_token_id) for p in prompts]
    assert [list(g.token_ids) for g in batched] == reference


def test_stop_tokens_and_stop_strings_end_replies(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = _prompts(tokenizer)
    free = generate_greedy(
        model, prompts, _decode(tokenizer), max_new_tokens=10, pad_id=tokenizer.pad_token_id
    )
    # stop at the first token of the first reply that was not generated before: it is never
    # included, and nothing after it
    tokens = free[0].token_ids
    first_new = next((i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]), 0)
    stopped = generate_greedy(model, prompts, _decode(tokenizer), max_new_tokens=10,
                              pad_id=tokenizer.pad_token_id, stop_token_ids={tokens[first_new]})  # fmt: skip
    assert stopped[0].token_ids == tokens[:first_new]
    # a stop string taken from the middle of the second reply cuts the text right before it
    text = free[1].text
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    cut = generate_greedy(model, prompts, _decode(tokenizer), max_new_tokens=10,
                          pad_id=tokenizer.pad_token_id, stop=[needle], batch_size=2)  # fmt: skip
    assert needle not in cut[1].text and text.startswith(cut[1].text)
    assert len(cut[1].token_ids) <= len(free[1].token_ids)


def _choice_fixture(tokenizer, long_prompt_words: int = 0):
    prompts = _prompts(tokenizer)
    if long_prompt_words:
        prompts = [tokenizer(" ".join(f"word{i}" for i in range(long_prompt_words))).input_ids, *prompts]
    choices = [
        [tokenizer(" yes and several more words").input_ids, tokenizer(" no").input_ids],
        [tokenizer(" fine").input_ids, tokenizer(" bad").input_ids, tokenizer(" ok then").input_ids],
        [tokenizer(" a").input_ids],
        [tokenizer(" Paris is").input_ids, tokenizer(" big").input_ids],
    ][-len(prompts) :]
    return prompts, choices


def _assert_matches_full_forward(model, prompts, choices, full_sequence_loglik, **kwargs):
    got = choice_loglikelihoods(model, prompts, choices, pad_id=2, **kwargs)
    expected = [[full_sequence_loglik(model, p, c) for c in cs] for p, cs in zip(prompts, choices)]
    assert [len(row) for row in got] == [len(cs) for cs in choices]
    for row_got, row_expected in zip(got, expected):
        assert row_got == pytest.approx(row_expected, abs=1e-4)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
@pytest.mark.parametrize("packed", [True, False])
def test_choice_loglikelihoods_equal_full_forward(spec, packed, full_sequence_loglik):
    """Both routes (packed 4D mask, KV cache), uneven prompts and choices, batches of 3 and 1."""
    model, tokenizer = load_model(spec)
    prompts, choices = _choice_fixture(tokenizer)
    _assert_matches_full_forward(model, prompts, choices, full_sequence_loglik, packed=packed, batch_size=3)
    _assert_matches_full_forward(
        model, prompts[:1], choices[:1], full_sequence_loglik, packed=packed, batch_size=1
    )


def test_packed_route_with_eager_attention(full_sequence_loglik):
    """The eager implementation adds the 4D mask to the scores (sdpa takes it as attn_mask)."""
    model, tokenizer = load_model("tiny-gemma3")
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    prompts, choices = _choice_fixture(tokenizer)
    _assert_matches_full_forward(model, prompts, choices, full_sequence_loglik, packed=True)


def test_rows_longer_than_a_sliding_window_take_the_cache_route(full_sequence_loglik):
    from forgetless.evaluation.inference import _packed_attention_ok

    model, tokenizer = load_model("tiny-gemma3")  # sliding window of 64 tokens
    prompts, choices = _choice_fixture(tokenizer, long_prompt_words=40)
    assert len(prompts[0]) > 64
    assert not _packed_attention_ok(model, len(prompts[0])) and _packed_attention_ok(model, 64)
    _assert_matches_full_forward(model, prompts, choices, full_sequence_loglik, batch_size=3)


@pytest.mark.parametrize("packed", [True, False])
def test_choice_loglikelihoods_on_peft_and_moe(tiny_mixtral, tokenizer, full_sequence_loglik, packed):
    peft = pytest.importorskip("peft")
    model, _ = load_model("tiny-llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora).eval()
    prompts, choices = _choice_fixture(tokenizer)
    for candidate in (peft_model, tiny_mixtral):
        _assert_matches_full_forward(candidate, prompts, choices, full_sequence_loglik, packed=packed)


def test_forgetless_adapters_evaluate_like_a_plain_forward(tokenizer, full_sequence_loglik):
    adapters = pytest.importorskip("forgetless.adapters")
    model, _ = load_model("tiny-llama")
    adapters.inject_adapters(model, adapters.AdapterConfig(kind="slim", r=4, seed=1))
    with torch.no_grad():  # non-zero B so that the adapters change the output
        for parameter in adapters.trainable_parameters(model):
            parameter.normal_(0, 0.05)
    model.eval()
    prompts, choices = _choice_fixture(tokenizer)
    for packed in (True, False):
        _assert_matches_full_forward(model, prompts, choices, full_sequence_loglik, packed=packed)
    generated = generate_greedy(
        model, prompts, _decode(tokenizer), max_new_tokens=5, pad_id=tokenizer.pad_token_id
    )
    assert [list(g.token_ids) for g in generated] == [
        _hf_greedy(model, p, 5, tokenizer.pad_token_id) for p in prompts
    ]


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate_greedy(torch.nn.Linear(1, 1), [[1]], str, max_new_tokens=0, pad_id=0)
    with pytest.raises(ValueError):
        choice_loglikelihoods(torch.nn.Linear(1, 1), [[1]], [], pad_id=0)
