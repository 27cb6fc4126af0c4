"""The router-training loop of ``router: trained``: experts and base frozen, only router rows learn."""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from forgetless.data import Example, PromptFormatter, collate


def train_router(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    router_weights: dict[str, nn.Parameter],
    examples: list[Example],
    steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
) -> list[float]:
    """Minimise the answer-token loss of ``examples`` over the router weights only.

    Every other parameter is frozen for the loop (and left frozen: the model is an artifact being
    built, not trained further). Batches cycle through a seeded shuffle of the examples.

    Args:
        router_weights: point -> the router parameter there, shape (num_experts, d_in).
        examples: prompt / answer pairs (formatted with the tokenizer's chat template if any).

    Returns:
        the loss of every step.
    """
    if not examples:
        raise ValueError("router training needs at least one example")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    params = list(router_weights.values())
    for parameter in params:
        parameter.requires_grad_(True)
    formatter = PromptFormatter(tokenizer, max_length=max_length)
    encoded = [formatter.encode(example) for example in examples]
    order: list[int] = []
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # eval mode: no dropout or router jitter, so the same seed gives the same router
    model.eval()
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            if len(order) < batch_size:
                refill = list(range(len(encoded)))
                rng.shuffle(refill)
                order.extend(refill)
            batch = [encoded[index] for index in order[:batch_size]]
            del order[:batch_size]
            inputs = collate(batch, pad_id=tokenizer.pad_token_id)
            loss = answer_loss(model, inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    for parameter in params:
        parameter.requires_grad_(False)
    return losses


def answer_loss(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Mean next-token loss over the answer tokens (labels != -100).

    Only the positions that predict an answer token go through the output layer: with a 49k
    vocabulary and answers of a few tokens after a chat-templated prompt, projecting every
    position would cost most of the step. Same value as ``model(**inputs).loss``.
    """
    config = getattr(model, "config", None)
    decoder, head = getattr(model, "model", None), model.get_output_embeddings()
    if decoder is None or head is None or getattr(config, "final_logit_softcapping", None):
        return model(**inputs).loss
    hidden = decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    labels = inputs["labels"][:, 1:]
    keep = labels != -100
    logits = head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep])


def rows_of(router_weights: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Detached float32 copies of router weights."""
    return {point: weight.detach().float().clone() for point, weight in router_weights.items()}


__all__ = ["answer_loss", "rows_of", "train_router"]
