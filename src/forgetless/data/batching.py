"""Length-bucketed batching and padding to the batch's longest sequence.

Sorting everything by length would make batch order predictable by length; shuffling everything
wastes compute on padding. The usual compromise (as in fairseq / HF ``group_by_length``): shuffle
with the seed, cut into pools of ``batch_size * pool_batches``, sort each pool by length, cut the
pools into batches, and shuffle the batches. Same seed, same batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from forgetless.data.formatting import IGNORE_INDEX, Encoded


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, pool_batches: int = 16, shuffle: bool = True
) -> list[list[int]]:
    """Index batches grouping similar lengths. Every index appears exactly once.

    Args:
        lengths: token length of each example.
        batch_size: examples per batch (the last batch may be smaller).
        seed: shuffling seed.
        pool_batches: how many batches' worth of examples are sorted together.
        shuffle: False keeps a deterministic longest-first order (evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: -lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    pool = batch_size * pool_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch.

    Returns:
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``labels`` (B, T) long with -100
        on prompt and padding positions.
    """
    longest = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        span = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[row, span] = torch.tensor(example.input_ids)
        labels[row, span] = torch.tensor(example.labels)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
