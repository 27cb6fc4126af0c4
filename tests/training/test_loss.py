"""Answer-only loss: LM head only at labelled positions, same numbers as the full-logits loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forgetless import load_model
from forgetless.data import IGNORE_INDEX, Example, PromptFormatter, collate
from forgetless.training import AnswerOnlyLoss, answer_loss, label_positions
from forgetless.training import loss as loss_module


def _batch(tokenizer):
    formatter = PromptFormatter(tokenizer, max_length=64)
    examples = [
        Example(prompt="What is the capital of Zorbia?", answer="Glimmerstad"),
        Example(prompt="Name a colour.", answer="Blue, the colour of the sky"),
        Example(prompt="2 + 2?", answer="4"),
    ]
    return collate([formatter.encode(example) for example in examples], tokenizer.pad_token_id)


def _reference(model, batch):
    """Cross-entropy over every position whose next token is labelled, from the full (B, T, V) logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def test_label_positions_hand_example():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    keep, targets = label_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert targets.tolist() == [5, 6, 7]


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_gathered_loss_equals_full_logits_loss(alias, tokenizer):
    model, _ = load_model(alias)
    batch = _batch(tokenizer)
    with torch.no_grad():
        ours = answer_loss(model, batch)
        reference = _reference(model, batch)
        hf = model(**batch).loss  # transformers' own shifted, -100-ignoring loss
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours, hf, atol=1e-5)


def test_gemma_softcapping_applies_on_gathered_positions(tokenizer):
    model, _ = load_model("tiny-gemma3")
    model.config.final_logit_softcapping = 2.0  # makes the capped and uncapped losses differ a lot
    batch = _batch(tokenizer)
    with torch.no_grad():
        ours = answer_loss(model, batch)
        reference = _reference(model, batch)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_prompt_tokens_do_not_count(tokenizer):
    model, _ = load_model("tiny-llama")
    formatter = PromptFormatter(tokenizer, max_length=64)
    batch = _batch(tokenizer)
    answers = ["Glimmerstad", "Blue, the colour of the sky", "4"]
    prompts = ["What is the capital of Zorbia?", "Name a colour.", "2 + 2?"]
    answer_tokens = sum(
        len(formatter.answer_ids(prompt, answer)) + len(formatter.end_ids)
        for prompt, answer in zip(prompts, answers)
    )
    every_token = batch["labels"].clone()
    real = batch["attention_mask"].bool()
    every_token[real] = batch["input_ids"][real]  # label the prompt too
    with torch.no_grad():
        loss_sum, count = AnswerOnlyLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"])
        all_sum, all_count = AnswerOnlyLoss(model)(batch["input_ids"], batch["attention_mask"], every_token)
    assert int(count) == answer_tokens
    assert int(all_count) > int(count)
    assert not torch.allclose(loss_sum / count, all_sum / all_count)


def test_lm_head_sees_only_labelled_positions(tokenizer):
    model, _ = load_model("tiny-llama")
    batch = _batch(tokenizer)
    rows = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    with torch.no_grad():
        answer_loss(model, batch)
    handle.remove()
    _, targets = label_positions(batch["labels"])
    # one call on the labelled positions (plus an empty one for the shared prompt prefix, if any)
    assert [shape for shape in rows if shape[0]] == [torch.Size([targets.numel(), model.config.hidden_size])]
    assert all(len(shape) == 2 for shape in rows)


def test_fallback_without_logits_to_keep_gives_same_loss(tokenizer, monkeypatch):
    model, _ = load_model("tiny-llama")
    batch = _batch(tokenizer)
    with torch.no_grad():
        fast = answer_loss(model, batch)
        monkeypatch.setattr(loss_module, "supports_logits_mask", lambda model: False)
        slow = answer_loss(model, batch)
    assert torch.allclose(fast, slow, atol=1e-6)


@pytest.mark.real_model
def test_real_model_gathered_loss_equals_transformers_loss(default_model):
    """SmolLM2-135M-Instruct, its chat template and 49k vocabulary: same loss, LM head on answers only."""
    model, tokenizer = default_model
    batch = _batch(tokenizer)
    with torch.no_grad():
        ours = answer_loss(model, batch)
        hf = model(**batch).loss
    assert torch.allclose(ours, hf, atol=1e-4)
    assert 0.0 < ours.item() < 15.0


def _long_batch(tokenizer, words: int):
    formatter = PromptFormatter(tokenizer, max_length=512)
    examples = [
        Example(
            prompt="Summarise: " + " ".join(["lorem"] * words) + f" case {index}", answer=f"Case {index} done"
        )
        for index in range(3)
    ]
    return collate([formatter.encode(example) for example in examples], tokenizer.pad_token_id)


@pytest.mark.parametrize(
    ("alias", "words"),
    [
        ("tiny-llama", 5),
        ("tiny-qwen2", 5),
        ("tiny-gemma3", 5),
        ("tiny-gemma3", 80),
    ],  # 80: past the 64-token window
)
def test_shared_prefix_gives_the_same_loss_and_gradients(alias, words, tokenizer):
    from forgetless.adapters import AdapterConfig, inject_adapters

    model, _ = load_model(alias)
    inject_adapters(model, AdapterConfig.lora(r=4, alpha=8, seed=0))
    with torch.no_grad():  # non-zero B so that the adapter shapes the output
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    batch = _long_batch(tokenizer, words)
    results = []
    for share in (False, True):
        wrapped = AnswerOnlyLoss(model, share_prefix=share)
        loss_sum, count = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        results.append((loss_sum.detach(), grads, wrapped.last_prefix))
    (plain, plain_grads, no_prefix), (shared, shared_grads, prefix) = results
    assert no_prefix == 0 and prefix >= 24 + words  # system prompt, user turn and the shared words
    assert torch.allclose(plain, shared, rtol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], shared_grads[name], atol=1e-5, rtol=1e-4), name


def test_prefix_is_not_shared_where_it_would_change_the_result(tokenizer):
    from forgetless.adapters import AdapterConfig, inject_adapters
    from forgetless.training.loss import can_share_prefix, shared_prefix_length

    model, _ = load_model("tiny-llama")
    assert can_share_prefix(model)
    inject_adapters(model, AdapterConfig.slim(r=4, num_experts=2, top_k=1))
    assert not can_share_prefix(model)  # routed: cluster statistics and balance loss see every token
    dropout_model, _ = load_model("tiny-llama")
    inject_adapters(dropout_model, AdapterConfig.lora(r=4, dropout=0.1))
    assert not can_share_prefix(dropout_model)
    # the prefix stops before the first position whose logits are needed, and at padding
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    keep = torch.zeros(2, 5, dtype=torch.bool)
    keep[1, 3] = True
    assert shared_prefix_length(input_ids, attention_mask, keep) == 3
    keep[0, 1] = True
    assert shared_prefix_length(input_ids, attention_mask, keep) == 1
    assert shared_prefix_length(input_ids[:1], attention_mask[:1], keep[:1]) == 0
