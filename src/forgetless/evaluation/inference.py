"""Batched inference for evaluation: greedy generation with a KV cache, and choice log-likelihoods.

Both work on any causal LM whose forward takes ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values`` and ``use_cache`` and returns ``logits`` and ``past_key_values`` (transformers
models, PEFT models, models with forgetless adapters injected, merged and Mixtral MoE models).

Prompts are left-padded so that every row's next token sits in the last column; position ids are
counted from each row's first real token, so a padded row sees exactly the positions it would see
alone (tests compare batched against one-by-one results). Prompts are grouped by length to keep
padding small and results are returned in input order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Generation:
    """One greedy reply: ``text`` cut at the first stop string, and the ``token_ids`` generated."""

    text: str
    token_ids: tuple[int, ...]


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the forward can skip the LM head on positions we do not need (a large CPU saving)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (B, T) long, left-padded to the longest row."""
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, longest - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _positions(attention_mask: Tensor) -> Tensor:
    """Position of every column counted from the row's first real token (pads get 0). (B, T) long."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _length_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches, longest first, so each batch holds similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((index for index in (text.find(s) for s in stop if s) if index >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_token_ids: set[int] | frozenset[int] = frozenset(),
    stop: Sequence[str] = (),
    batch_size: int = 16,
) -> list[Generation]:
    """Greedy replies to tokenised prompts, batched, with a KV cache.

    A row stops at a stop token (not included), at a stop string (cut from the text), or after
    ``max_new_tokens``; finished rows leave the batch (their cache rows are dropped), so a batch
    costs what its longest reply costs only for the rows still running.

    Args:
        model: causal LM in eval mode.
        prompts: token ids per prompt (special tokens included).
        decode: token ids -> text (the tokenizer's decode without special tokens).
        max_new_tokens: generation budget per prompt.
        pad_id: id used for left padding (masked out).
        stop_token_ids: ids that end a reply (EOS, end of turn).
        stop: strings that end a reply; the text from the first one on is dropped.
        batch_size: prompts per forward pass.

    Returns:
        One ``Generation`` per prompt, in input order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model_device(model)
    keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    results: list[Generation | None] = [None] * len(prompts)
    for batch in _length_order([len(p) for p in prompts], batch_size):
        input_ids, attention_mask = _left_pad([prompts[i] for i in batch], pad_id, device)
        positions = _positions(attention_mask)
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       use_cache=True, **keep_last)  # fmt: skip
        cache, next_position = output.past_key_values, positions[:, -1:] + 1
        next_tokens = output.logits[:, -1].argmax(-1)
        active = list(batch)  # prompt index of each row still generating
        generated: dict[int, list[int]] = {i: [] for i in batch}
        for step in range(max_new_tokens):
            still_running = []
            for row, index in enumerate(active):
                token = int(next_tokens[row])
                finished = token in stop_token_ids
                if not finished:
                    generated[index].append(token)
                    if stop:
                        finished = _cut_at_stop(decode(generated[index]), stop)[1]
                if not finished and step + 1 < max_new_tokens:
                    still_running.append(row)
            if not still_running:
                break
            if len(still_running) < len(active):
                keep = torch.tensor(still_running, device=device)
                cache.reorder_cache(keep)
                attention_mask, next_position = attention_mask[keep], next_position[keep]
                next_tokens = next_tokens[keep]
                active = [active[row] for row in still_running]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            output = model(input_ids=next_tokens[:, None], attention_mask=attention_mask,
                           position_ids=next_position, past_key_values=cache, use_cache=True)  # fmt: skip
            cache, next_position = output.past_key_values, next_position + 1
            next_tokens = output.logits[:, -1].argmax(-1)
        for index in batch:
            text, _ = _cut_at_stop(decode(generated[index]), stop)
            results[index] = Generation(text=text.strip(), token_ids=tuple(generated[index]))
    return results  # type: ignore[return-value]


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 16,
) -> list[list[float]]:
    """Summed log-probability of each choice's tokens as the continuation of its prompt.

    Each prompt is encoded once: a first pass over the (left-padded) prompts fills the KV cache and
    gives the distribution of every choice's first token; the cache rows are then repeated per
    choice and all choices of the batch's questions go through one second pass (right-padded).

    Args:
        model: causal LM in eval mode.
        prompts: token ids per question (special tokens included), Q lists.
        choices: per question, the token ids of each choice as it continues the prompt.
        pad_id: padding id (masked out).
        batch_size: questions per pass (the second pass holds their choices, e.g. 4x as many rows).

    Returns:
        Per question, one log-likelihood per choice (0.0 for a choice with no tokens).
    """
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    device = model_device(model)
    keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    results: list[list[float]] = [[] for _ in prompts]
    for batch in _length_order([len(p) for p in prompts], batch_size):
        input_ids, prompt_mask = _left_pad([prompts[i] for i in batch], pad_id, device)
        positions = _positions(prompt_mask)
        output = model(input_ids=input_ids, attention_mask=prompt_mask, position_ids=positions,
                       use_cache=True, **keep_last)  # fmt: skip
        first_logprobs = torch.log_softmax(output.logits[:, -1].float(), dim=-1)  # (Q, V)
        cache = output.past_key_values

        question_of_row = [q for q, index in enumerate(batch) for _ in choices[index]]
        rows = [list(choice) for index in batch for choice in choices[index]]
        if not rows:
            continue
        longest = max(1, max(len(row) for row in rows))
        continuation = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        continuation_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, row in enumerate(rows):
            if row:
                continuation[r, : len(row)] = torch.tensor(row, dtype=torch.long)
                continuation_mask[r, : len(row)] = 1
        continuation, continuation_mask = continuation.to(device), continuation_mask.to(device)
        row_question = torch.tensor(question_of_row, device=device)

        # first token of every choice: read from the prompt pass
        first = first_logprobs[row_question].gather(1, continuation[:, :1]).squeeze(1)  # (R,)
        totals = first * continuation_mask[:, 0]
        if longest > 1:
            cache.reorder_cache(row_question)
            attention_mask = torch.cat([prompt_mask[row_question], continuation_mask], dim=1)
            start = positions[row_question, -1:] + 1
            choice_positions = start + torch.arange(longest, device=device)
            # only the first longest-1 tokens need a forward: the last token predicts nothing we score
            output = model(input_ids=continuation[:, :-1], attention_mask=attention_mask[:, :-1],
                           position_ids=choice_positions[:, :-1], past_key_values=cache, use_cache=True)  # fmt: skip
            logits = output.logits.float()  # (R, longest-1, V)
            targets = continuation[:, 1:]
            token_logprobs = logits.gather(2, targets[..., None]).squeeze(2) - logits.logsumexp(-1)
            totals = totals + (token_logprobs * continuation_mask[:, 1:]).sum(1)
        for r, q in enumerate(question_of_row):
            results[batch[q]].append(float(totals[r]))
    return results
