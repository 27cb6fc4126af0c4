"""Batched inference for evaluation: greedy generation with a KV cache, and choice log-likelihoods.

Both work on any causal LM whose forward takes ``input_ids``, ``attention_mask``, ``position_ids``,
a KV cache (``cache``, or ``past_key_values`` before transformers 5.24: ``forgetless.compat``) and
``use_cache`` and returns ``logits`` and that cache (transformers models, PEFT models, models with
forgetless adapters injected, merged and Mixtral MoE models).

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

from forgetless.adapters.gate import prompt_boundary
from forgetless.adapters.pooling import (
    gate_state,
    joined_gate_state,
    reorder_sequence_state,
    set_gate_state,
    uses_sequence_state,
)
from forgetless.compat import cache_kwargs, drop_leading_columns, join_caches, joinable_cache, output_cache


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


def _mask_padded(attention_mask: Tensor, width: int) -> Tensor:
    """(B, T) -> (B, width) with zeros (padding) before the first column."""
    missing = width - attention_mask.shape[1]
    return torch.nn.functional.pad(attention_mask, (missing, 0)) if missing else attention_mask


def _positions(attention_mask: Tensor) -> Tensor:
    """Position of every column counted from the row's first real token (pads get 0). (B, T) long."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _length_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches, longest first, so each batch holds similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((index for index in (text.find(s) for s in stop if s) if index >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class CachedBatch:
    """Rows that decode together on one KV cache: a left-padded prefill, then one token per row per
    step; rows that finish leave the batch (``keep``), and the cache rows and the model's
    per-sequence state (prompt pooling, SLIM's sample-level gate) are dropped with them. The one
    decoding loop of ``generate_greedy`` and of ``forgetless serve``'s worker (serving/engine.py).

    Args:
        model: causal LM in eval mode.
        prompts: token ids per row (special tokens included), none empty.
        pad_id: id used for left padding (masked out).
        prompt_logits: keep the logits of every prompt column (``prompt_logits``), not only the last.

    After construction, ``logits`` (B, V) predicts each row's first new token; ``prompt_logits``
    is (B, T, V) for the padded prompts when asked for, else None. ``join`` adds rows while the
    batch decodes (continuous batching).
    """

    @torch.no_grad()
    def __init__(
        self, model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, prompt_logits: bool = False
    ) -> None:
        self.model, self.device, self.pad_id = model, model_device(model), pad_id
        self._joinable: bool | None = None
        keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) and not prompt_logits else {}
        input_ids, self.attention_mask = _left_pad(prompts, pad_id, self.device)
        positions = _positions(self.attention_mask)
        output = model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=positions,
                       use_cache=True, **keep_last)  # fmt: skip
        self.cache, self.next_position = output_cache(output), positions[:, -1:] + 1
        self.logits: Tensor = output.logits[:, -1]
        self.prompt_logits: Tensor | None = output.logits if prompt_logits else None

    def __len__(self) -> int:
        return self.attention_mask.shape[0]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices into the current rows, in order); a no-op when all stay."""
        if len(rows) == len(self):
            return
        keep = torch.tensor(list(rows), device=self.device)
        self.cache.reorder_cache(keep)
        reorder_sequence_state(self.model, keep)
        self.attention_mask, self.next_position = self.attention_mask[keep], self.next_position[keep]
        self.logits, self.prompt_logits = self.logits[keep], None

    def _drop_padding_columns(self) -> None:
        """Drop leading columns that are padding in every row (left by rows that left the batch):
        each row's positions are its own and masked columns add nothing, so results stay the
        same (up to float summation order); a batch that rows keep joining does not grow wider
        with every step it has run. Called by ``join`` only: plain batched generation keeps its
        shapes, and so its numbers, exactly as before."""
        real = self.attention_mask.any(dim=0)
        first = int(real.float().argmax()) if bool(real.any()) else 0
        if first > 0 and joinable_cache(self.cache):
            drop_leading_columns(self.cache, first)
            self.attention_mask = self.attention_mask[:, first:]

    def can_join(self) -> bool:
        """Whether ``join`` can add rows: a cache of full-length layers, and no prompt pooling
        (its running per-row means are not joined). Decided once per batch (the serving worker
        asks before every step while requests wait)."""
        if self._joinable is None:
            self._joinable = joinable_cache(self.cache) and not uses_sequence_state(self.model)
        return self._joinable

    @torch.no_grad()
    def join(
        self,
        prompts: Sequence[Sequence[int]],
        prompt_logits: bool = False,
        after_prefill: Callable[[CachedBatch], None] | None = None,
    ) -> CachedBatch:
        """Prefill ``prompts`` on their own and append them as rows after the current ones.

        The shorter of the two caches (and its attention mask) is left-padded to the longer, which
        every row's own positions and mask make invisible, and the model's per-sequence gate state
        is joined in the same row order. ``after_prefill(new)`` runs while the model's state holds
        the new rows alone (to read their routes). Returns the new rows' own batch (its ``logits``
        and ``prompt_logits``). Needs ``can_join()``.
        """
        running = gate_state(self.model)
        try:
            new = CachedBatch(self.model, prompts, self.pad_id, prompt_logits=prompt_logits)
            added = gate_state(self.model)
            if after_prefill is not None:
                after_prefill(new)
            self._drop_padding_columns()  # a valid state on its own: the running rows stay as they are
            width = max(self.attention_mask.shape[1], new.attention_mask.shape[1])
            mask = torch.cat(
                [_mask_padded(self.attention_mask, width), _mask_padded(new.attention_mask, width)]
            )
            positions = torch.cat([self.next_position, new.next_position])
            logits = torch.cat([self.logits, new.logits])
            join_caches(self.cache, new.cache)  # builds every layer's tensors before it assigns any
        except BaseException:
            set_gate_state(self.model, running)  # the running rows go on as they were
            raise
        self.attention_mask, self.next_position, self.logits, self.prompt_logits = (
            mask,
            positions,
            logits,
            None,
        )
        set_gate_state(self.model, joined_gate_state(running, added))
        return new

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (B,) long; returns (B, V) logits of each row's next token."""
        one_more = self.attention_mask.new_ones((len(self), 1))
        self.attention_mask = torch.cat([self.attention_mask, one_more], dim=1)
        output = self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                            position_ids=self.next_position, use_cache=True,
                            **cache_kwargs(self.model, self.cache))  # fmt: skip
        self.cache, self.next_position = output_cache(output), self.next_position + 1
        self.logits = output.logits[:, -1]
        return self.logits


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
    results: list[Generation | None] = [None] * len(prompts)
    for batch in _length_order([len(p) for p in prompts], batch_size):
        rows = CachedBatch(model, [prompts[i] for i in batch], pad_id)
        next_tokens = rows.logits.argmax(-1)
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
                        finished = cut_at_stop(decode(generated[index]), stop)[1]
                if not finished and step + 1 < max_new_tokens:
                    still_running.append(row)
            if not still_running:
                break
            rows.keep(still_running)
            next_tokens = next_tokens[torch.tensor(still_running, device=next_tokens.device)]
            active = [active[row] for row in still_running]
            next_tokens = rows.step(next_tokens).argmax(-1)
        for index in batch:
            text, _ = cut_at_stop(decode(generated[index]), stop)
            results[index] = Generation(text=text.strip(), token_ids=tuple(generated[index]))
    return results  # type: ignore[return-value]


def _packed_attention_ok(model: nn.Module, longest_row: int) -> bool:
    """Whether the model takes a custom 4D attention mask for rows of this length.

    transformers models pass a 4D mask through unchanged with the ``sdpa`` and ``eager`` attention
    implementations; flash attention cannot take one, and a sliding-window layer would need the
    window folded into the mask, so rows longer than the window use the KV-cache route instead.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or longest_row <= window


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def _packed_batch(
    model: nn.Module,
    prompts: list[Sequence[int]],
    choices: list[Sequence[Sequence[int]]],
    pad_id: int,
    keep_logits: bool,
) -> list[list[float]]:
    """One pass per batch: each row is a prompt followed by all its choices, and a 4D mask lets each
    choice see the prompt and itself only (positions restart after the prompt for every choice).

    Row layout (left-padded to T): [pad .. pad | prompt (P) | choice 1 (L1 - 1) | choice 2 (L2 - 1) ...].
    A choice's last token is not fed: it is scored from the position before it and predicts
    nothing we need. Segment ids: -1 pad, 0 prompt, k for choice k. Query i may attend key j when
    j <= i, both are real tokens, and key j is in the prompt or in the query's own choice.
    """
    device = model_device(model)
    rows, segments, positions, tails = [], [], [], []
    for prompt, options in zip(prompts, choices):
        row, segment, position = list(prompt), [0] * len(prompt), list(range(len(prompt)))
        for k, option in enumerate(options, start=1):
            fed = list(option)[:-1]
            row += fed
            segment += [k] * len(fed)
            position += range(len(prompt), len(prompt) + len(fed))
        rows.append(row)
        segments.append(segment)
        positions.append(position)
        tails.append(len(row) - len(prompt))  # fed choice tokens after the prompt
    width = max(len(row) for row in rows)
    pad = [width - len(row) for row in rows]
    input_ids = torch.tensor([[pad_id] * n + row for n, row in zip(pad, rows)], device=device)
    segment_ids = torch.tensor([[-1] * n + seg for n, seg in zip(pad, segments)], device=device)
    position_ids = torch.tensor([[0] * n + pos for n, pos in zip(pad, positions)], device=device)

    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = causal & (query >= 0) & (key >= 0) & ((key == 0) | (key == query))
    # a padding query sees only itself, so that no softmax row is empty (its output is never read)
    allowed |= torch.eye(width, dtype=torch.bool, device=device) & (query < 0)
    dtype = _model_dtype(model)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )

    keep = max(tails) + 1  # the last prompt token predicts every choice's first token
    extra = {"logits_to_keep": keep} if keep_logits else {}
    # a sample-level SLIM gate decides each row from its prompt (segment 0) alone
    with prompt_boundary(model, segment_ids == 0):
        logits = model(
            input_ids=input_ids, attention_mask=mask[:, None], position_ids=position_ids, **extra
        ).logits
    offset = width - logits.shape[1]  # column of logits[:, 0]

    batch_rows, columns, targets, owners = [], [], [], []
    for b, options in enumerate(choices):
        prompt_end = width - tails[b] - 1  # column of the prompt's last token
        start = prompt_end + 1
        for k, option in enumerate(options):
            for t, token in enumerate(option):
                batch_rows.append(b)
                columns.append((prompt_end if t == 0 else start + t - 1) - offset)
                targets.append(token)
                owners.append((b, k))
            start += max(len(option) - 1, 0)
    results = [[0.0] * len(options) for options in choices]
    if batch_rows:
        picked = logits[torch.tensor(batch_rows, device=device), torch.tensor(columns, device=device)].float()
        token_logprobs = picked.gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1)
        token_logprobs = token_logprobs - picked.logsumexp(-1)
        for (b, k), value in zip(owners, token_logprobs.tolist()):
            results[b][k] += value
    return results


@torch.no_grad()
def _cached_batch(
    model: nn.Module,
    prompts: list[Sequence[int]],
    choices: list[Sequence[Sequence[int]]],
    pad_id: int,
    keep_logits: bool,
) -> list[list[float]]:
    """Two passes: the left-padded prompts fill a KV cache (and give every choice's first token),
    then the cache rows are repeated per choice and all choices run through it right-padded."""
    device = model_device(model)
    input_ids, prompt_mask = _left_pad(prompts, pad_id, device)
    positions = _positions(prompt_mask)
    extra = {"logits_to_keep": 1} if keep_logits else {}
    output = model(input_ids=input_ids, attention_mask=prompt_mask, position_ids=positions,
                   use_cache=True, **extra)  # fmt: skip
    first_logprobs = torch.log_softmax(output.logits[:, -1].float(), dim=-1)  # (Q, V)
    cache = output_cache(output)

    question_of_row = [q for q, options in enumerate(choices) for _ in options]
    rows = [list(option) for options in choices for option in options]
    results: list[list[float]] = [[] for _ in prompts]
    if not rows:
        return results
    longest = max(1, max(len(row) for row in rows))
    continuation = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    continuation_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        if row:
            continuation[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            continuation_mask[r, : len(row)] = 1
    continuation, continuation_mask = continuation.to(device), continuation_mask.to(device)
    row_question = torch.tensor(question_of_row, device=device)

    first = first_logprobs[row_question].gather(1, continuation[:, :1]).squeeze(1)  # (R,)
    totals = first * continuation_mask[:, 0]
    if longest > 1:
        cache.reorder_cache(row_question)
        reorder_sequence_state(model, row_question)
        attention_mask = torch.cat([prompt_mask[row_question], continuation_mask], dim=1)
        choice_positions = positions[row_question, -1:] + 1 + torch.arange(longest, device=device)
        # only the first longest-1 tokens need a forward: the last token predicts nothing we score
        output = model(input_ids=continuation[:, :-1], attention_mask=attention_mask[:, :-1],
                       position_ids=choice_positions[:, :-1], use_cache=True, **cache_kwargs(model, cache))  # fmt: skip
        logits = output.logits.float()  # (R, longest-1, V)
        token_logprobs = logits.gather(2, continuation[:, 1:, None]).squeeze(2) - logits.logsumexp(-1)
        totals = totals + (token_logprobs * continuation_mask[:, 1:]).sum(1)
    for r, q in enumerate(question_of_row):
        results[q].append(float(totals[r]))
    return results


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 16,
    packed: bool | None = None,
) -> list[list[float]]:
    """Summed log-probability of each choice's tokens as the continuation of its prompt.

    Each prompt is encoded once, never once per choice. The default route packs a question's
    prompt and all its choices into one row with a 4D attention mask (one forward pass, no
    padding between choices, no copied cache). Models that cannot take such a mask (flash
    attention, rows longer than a sliding window, modules without a transformers config) take the
    KV-cache route: prompts first, then all choices from the repeated cache. Both equal one
    unbatched forward per choice (tested).

    Args:
        model: causal LM in eval mode.
        prompts: token ids per question (special tokens included), Q lists.
        choices: per question, the token ids of each choice as it continues the prompt.
        pad_id: padding id (masked out).
        batch_size: questions per forward pass.
        packed: force the packed (True) or the KV-cache (False) route; None picks per batch.

    Returns:
        Per question, one log-likelihood per choice (0.0 for a choice with no tokens).
    """
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token (its last token predicts the choices)")
    keep_logits = _accepts_logits_to_keep(model)
    # a packed row holds several sequences (the prompt and each choice); prompt-pooling adapters
    # carry a running mean along a row, which would mix them: they take the KV-cache route
    sequence_state = uses_sequence_state(model)
    sizes = [len(p) + sum(len(c) for c in options) for p, options in zip(prompts, choices)]
    results: list[list[float]] = [[] for _ in prompts]
    for batch in _length_order(sizes, batch_size):
        batch_prompts = [prompts[i] for i in batch]
        batch_choices = [choices[i] for i in batch]
        use_packed = not sequence_state and (
            packed if packed is not None else _packed_attention_ok(model, max(sizes[i] for i in batch))
        )
        route = _packed_batch if use_packed else _cached_batch
        for index, scores in zip(batch, route(model, batch_prompts, batch_choices, pad_id, keep_logits)):
            results[index] = scores
    return results
