"""What differs between the transformers 5.x releases we support, in one place.

transformers 5.24 renamed the KV-cache argument of ``forward`` from ``past_key_values`` to
``cache`` (the old keyword is deprecated until 5.40) and the output field with it. Every call that
feeds a cache back in goes through ``cache_kwargs`` and every read goes through ``output_cache``,
so the same code runs on both sides of the rename without deprecation warnings.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn


@lru_cache(maxsize=64)
def _forward_parameters(forward_type: type, name: str) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(getattr(forward_type, name)).parameters)
    except (TypeError, ValueError):
        return frozenset()


def forward_parameters(model: nn.Module) -> frozenset[str]:
    """Named parameters of the underlying Hugging Face model's ``forward`` (PEFT wrappers unwrapped)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_parameters(type(inner), "forward")


def cache_argument(model: nn.Module) -> str | None:
    """The keyword that passes a KV cache to ``model.forward``: ``cache``, ``past_key_values`` or None."""
    parameters = forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the keyword this model's ``forward`` takes."""
    return {cache_argument(model) or "past_key_values": cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned (``cache`` or ``past_key_values``)."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise AttributeError("the model returned no KV cache; call it with use_cache=True")


def joinable_cache(cache: Any) -> bool:
    """Whether ``join_caches`` can append rows to ``cache``: a cache of full-length layers
    (transformers' ``DynamicLayer``: keys and values (B, H, L, D)). Sliding-window, static and
    quantised layers keep positions in other ways and are not joined."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def join_caches(first: Any, second: Any) -> None:
    """Append ``second``'s rows to ``first`` (both ``joinable_cache``), in place. The shorter one is
    left-padded with zeros to the longer length; the caller pads the attention masks alike, so the
    padded positions are masked out. transformers has no batch-append for caches (only
    ``reorder_cache`` / ``batch_repeat_interleave``), hence this."""
    joined = []
    for mine, theirs in zip(first.layers, second.layers, strict=True):
        width = max(mine.keys.shape[-2], theirs.keys.shape[-2])
        keys = torch.cat([_left_padded(mine.keys, width), _left_padded(theirs.keys, width)])
        values = torch.cat([_left_padded(mine.values, width), _left_padded(theirs.values, width)])
        joined.append((keys, values))
    for layer, (keys, values) in zip(first.layers, joined):  # all built: nothing is half joined
        layer.keys, layer.values = keys, values


def _left_padded(states: Tensor, width: int) -> Tensor:
    """(B, H, L, D) -> (B, H, width, D) with zeros before the first position."""
    missing = width - states.shape[-2]
    if missing == 0:
        return states
    return torch.cat([states.new_zeros(*states.shape[:-2], missing, states.shape[-1]), states], dim=-2)


def drop_leading_columns(cache: Any, count: int) -> None:
    """Drop the first ``count`` positions of every layer of a ``joinable_cache``, in place (the
    columns that are padding in every row once the rows that needed them have left)."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., count:, :]
        layer.values = layer.values[..., count:, :]
