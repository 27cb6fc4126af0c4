"""Prompt-level yielding: the pooled signal's arithmetic, and the same answers cached or not."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import logits, randomize_adapters, recompute_greedy

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    PromptPool,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapter,
    reorder_sequence_state,
    save_adapter,
    set_inference_options,
)
from forgetless.adapters.base import TokenContext
from forgetless.compat import cache_kwargs, output_cache
from forgetless.errors import InputError
from forgetless.evaluation.inference import choice_loglikelihoods, generate_greedy


def _pooled_model(alias: str = "tiny-llama", pooling: str = "prompt", **fields):
    model, tokenizer = load_model(alias, seed=0)
    config = AdapterConfig.slim(r=4, num_experts=3, num_identity_experts=2, yield_pooling=pooling, **fields)
    inject_adapters(model, config)
    randomize_adapters(model, seed=3, scale=0.3)
    # learn the clusters and the sequence statistics on a few batches (train mode)
    generator = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            ids = torch.randint(10, 2000, (4, 14), generator=generator)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return model.eval(), tokenizer


def test_pooled_signal_is_a_causal_mean_of_content_tokens_z_scored():
    pool = PromptPool(skip=2, momentum=0.9)
    context = TokenContext()
    d = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 0.0]])
    context.attention_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left-padded
    z = pool(d.reshape(-1), torch.Size([2, 5]), context, learn=True).view(2, 5)
    # content = real tokens after the first 2: row 0 from its 3rd real token (3.0), row 1 from 7.0
    means = torch.tensor([[0, 0, 0, 3.0, 3.5], [0, 0, 7.0, 7.5, 5.0]])
    final = torch.tensor([3.5, 5.0])  # the first batch sets the statistics: its rows' final means
    mu, sigma = final.mean(), final.std(unbiased=False)
    expected = torch.where(means > 0, (means - mu) / sigma, torch.zeros(()))
    torch.testing.assert_close(z, expected)
    # a continuation (KV cache: the mask covers the past) goes on from the running sums, frozen
    context.attention_mask = torch.ones(2, 6, dtype=torch.long)
    z_next = pool(torch.tensor([1.5, 10.0]), torch.Size([2, 1]), context, learn=False)
    torch.testing.assert_close(z_next, (torch.tensor([(3 + 4 + 1.5) / 3, (7 + 8 + 0 + 10) / 4]) - mu) / sigma)
    reorder_sequence_state(torch.nn.Sequential(pool), torch.tensor([1]))  # drop row 0
    context.attention_mask = torch.ones(1, 7, dtype=torch.long)
    z_last = pool(torch.tensor([5.0]), torch.Size([1, 1]), context, learn=False)
    torch.testing.assert_close(z_last, (torch.tensor([30.0 / 5]) - mu) / sigma)
    with pytest.raises(RuntimeError, match="reorder_sequence_state"):
        context.attention_mask = torch.ones(3, 8, dtype=torch.long)
        pool(torch.zeros(3), torch.Size([3, 1]), context, learn=False)


def test_prompt_pooling_needs_identity_experts():
    with pytest.raises(InputError, match="yield_pooling prompt needs identity experts"):
        AdapterConfig.moe_lora(yield_pooling="prompt")


def test_cached_decoding_equals_one_full_forward():
    model, _ = _pooled_model(yield_skip=3)
    ids = torch.randint(10, 2000, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    full = logits(model, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        out = model(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(7, 11):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True,
                        **cache_kwargs(model, cache))  # fmt: skip
            steps.append(out.logits)
            cache = output_cache(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_batched_generation_with_dropped_rows_equals_recomputing_each_prompt():
    model, tokenizer = _pooled_model(yield_skip=2)
    texts = ["Hello there, how are you doing today my friend?", "Hi", "The capital of France is a city"]
    prompts = [tokenizer(text).input_ids for text in texts]
    free = [recompute_greedy(model, p, 6, set()) for p in prompts]
    stop = {free[1][2]} if free[1][2] not in free[0] else {free[1][1]}  # ends some rows early
    reference = [recompute_greedy(model, p, 6, stop) for p in prompts]
    assert len({len(r) for r in reference}) > 1  # rows really leave the batch at different steps
    batched = generate_greedy(
        model, prompts, lambda ids: tokenizer.decode(ids), max_new_tokens=6,
        pad_id=tokenizer.pad_token_id, stop_token_ids=stop,
    )  # fmt: skip
    assert [list(g.token_ids) for g in batched] == reference


def test_choice_loglikelihoods_equal_a_full_forward_per_choice():
    model, tokenizer = _pooled_model(yield_skip=2)
    prompts = [tokenizer("Question one is here").input_ids, tokenizer("Two").input_ids]
    choices = [[[11, 12, 13], [14]], [[15, 16], [17, 18, 19], [20]]]
    expected = []
    for prompt, options in zip(prompts, choices):
        row = []
        for option in options:
            ids = torch.tensor([list(prompt) + option])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            row.append(sum(float(logprobs[len(prompt) - 1 + t, token]) for t, token in enumerate(option)))
        expected.append(row)
    for packed in (None, True):  # pooled models always take the KV-cache route
        got = choice_loglikelihoods(model, prompts, choices, pad_id=tokenizer.pad_token_id, packed=packed)
        for row, reference in zip(got, expected):
            assert row == pytest.approx(reference, abs=1e-4)


def test_pooling_changes_routing_only_through_yielding_and_survives_save_load(tmp_path):
    model, _ = _pooled_model(yield_skip=2)
    token_model, _ = _pooled_model(pooling="token")
    state = adapter_state_dict(model)
    assert any(name.endswith("pool.sequence_mean") for name in state)
    with torch.no_grad():  # same experts, router and clusters; only the yielding signal differs
        for name, tensor in token_model.state_dict(keep_vars=True).items():
            if name in state:
                tensor.copy_(state[name])
    batch = {"input_ids": torch.randint(10, 2000, (2, 12), generator=torch.Generator().manual_seed(2))}
    assert not torch.allclose(logits(model, batch), logits(token_model, batch))
    set_inference_options(model, yield_scale=0.0)
    set_inference_options(token_model, yield_scale=0.0)
    # (equal up to rounding: the token model takes the folded inference path, the pooled one cannot)
    torch.testing.assert_close(logits(model, batch), logits(token_model, batch), rtol=0, atol=1e-5)
    set_inference_options(model, yield_scale=1.0)

    save_adapter(model, tmp_path / "adapter", "tiny-llama")
    fresh, _ = load_model("tiny-llama", seed=0)
    load_adapter(fresh, tmp_path / "adapter")
    pools = [layer.pool for layer in adapter_layers(fresh).values()]
    assert all(pool is not None and int(pool.batches) == 3 for pool in pools)
    assert torch.equal(logits(fresh.eval(), batch), logits(model, batch))
