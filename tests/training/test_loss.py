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
    assert rows == [torch.Size([targets.numel(), model.config.hidden_size])]


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
