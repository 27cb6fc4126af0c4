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

from torch import nn


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
