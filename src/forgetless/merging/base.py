"""The merge-method registry and the maths the methods share (trim, random drop, sign election).

A merge method is one decorated pure function whose signature is its configuration (the mergekit
pattern). Every method is called the same way on one tensor name at a time::

    merged = method.function(base, tensors, weight=[...], density=[...], lambda_=1.0, seed=7)

- ``base``: the base model's tensor, shape ``S`` (None when the method needs no base and none is
  given). For LoRA inputs the base is a zero tensor and ``tensors`` are the dense deltas ``s B A``.
- ``tensors``: one tensor of shape ``S`` per input model, in config order. Never modified.
- per-model parameters (``weight``, ``density``): one float per input model.
- shared parameters (``lambda_``, ``normalize``, ``rescale``, ``seed``): keyword-only arguments with
  defaults; their YAML names drop the trailing underscore (``lambda``).

``lora_average`` is the one method that works on LoRA factors instead of tensors; it declares
``inputs="lora_factors"`` and is called with ``(factors, weight=...)``.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from forgetless.registry import Registry


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and what its signature says about its configuration.

    Attributes:
        name: registry name (the YAML ``merge_method``).
        function: the pure tensor function.
        needs_base: True when the method measures task vectors against a base model.
        per_model: per-model parameter names and their defaults (``weight``, ``density``).
        shared: shared parameter YAML names and their defaults (``lambda``, ``normalize`` ...).
        inputs: ``tensors`` (full weights or dense LoRA deltas) or ``lora_factors``.
        random: True when the result depends on ``seed`` (random drop).
    """

    name: str
    function: Callable[..., Any]
    needs_base: bool
    per_model: dict[str, float]
    shared: dict[str, Any] = field(default_factory=dict)
    inputs: Literal["tensors", "lora_factors"] = "tensors"
    random: bool = False

    @property
    def description(self) -> str:
        return (inspect.getdoc(self.function) or "").splitlines()[0]

    def python_name(self, yaml_name: str) -> str:
        """``lambda`` -> ``lambda_`` (Python keywords get a trailing underscore in signatures)."""
        return f"{yaml_name}_" if yaml_name in ("lambda",) else yaml_name


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", package="forgetless.merging.methods")


def merge_method(
    name: str,
    *,
    needs_base: bool,
    per_model: dict[str, float],
    inputs: Literal["tensors", "lora_factors"] = "tensors",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``function`` as merge method ``name``; its keyword-only defaults are the shared parameters."""

    def add(function: Callable[..., Any]) -> Callable[..., Any]:
        shared: dict[str, Any] = {}
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.name in per_model:
                continue
            if parameter.name == "seed":  # set by the merge's top-level seed, per tensor
                continue
            assert parameter.default is not inspect.Parameter.empty, (
                f"{name}: {parameter.name} needs a default"
            )
            shared[parameter.name.rstrip("_")] = parameter.default
        random = "seed" in inspect.signature(function).parameters
        MERGE_METHODS.register(
            name,
            MergeMethod(name, function, needs_base, dict(per_model), shared, inputs, random),
        )
        return function

    return add


# --------------------------------------------------------------------------------------------
# Shared maths. Computation runs in float32 (float64 stays float64): merging bf16 weights in bf16
# would round every intermediate sum; the caller casts the result to the output dtype.


def work_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def check_inputs(
    base: Tensor | None, tensors: Sequence[Tensor], per_model: dict[str, Sequence[float]]
) -> None:
    """Internal invariants (config validation has already told the user about real mistakes)."""
    if not tensors:
        raise ValueError("merging needs at least one input tensor")
    shape = tensors[0].shape if base is None else base.shape
    for tensor in tensors:
        if tensor.shape != shape:
            raise ValueError(f"shape mismatch: {tuple(tensor.shape)} vs {tuple(shape)}")
    for key, values in per_model.items():
        if len(values) != len(tensors):
            raise ValueError(f"{key} has {len(values)} values for {len(tensors)} input tensors")


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``k = max(1, int(density * numel))`` largest-magnitude entries of ``delta``, zero the rest.

    TIES step 1 ("trim"). Exactly ``k`` entries survive; among entries of equal magnitude at the
    cut the one with the lower flat index wins, so the result is deterministic. Returns a new tensor.
    """
    if density >= 1:
        return delta.clone()
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    magnitude = flat.abs()
    # kthvalue is a linear-time selection, much cheaper than sorting tens of millions of entries.
    threshold = torch.kthvalue(magnitude, flat.numel() - k + 1).values
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:  # entries equal to the threshold fill the remaining places, lowest index first
        ties = (magnitude == threshold).nonzero().squeeze(1)[:missing]
        keep[ties] = True
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype)).reshape(delta.shape)


_MASK_BLOCK = 1 << 20


def keep_mask(shape: torch.Size, density: float, seed: int, stream: int) -> Tensor:
    """Bernoulli(``density``) keep mask, a pure function of (shape, seed, stream).

    The flat tensor is cut into fixed blocks of 2^20 entries and block ``b`` draws from its own
    generator seeded by (seed, stream, b): the mask does not depend on the order tensors are
    processed in or on the global RNG, so a streamed merge and an in-memory merge drop exactly the
    same entries.
    """
    numel = 1
    for size in shape:
        numel *= size
    mask = torch.empty(numel, dtype=torch.bool)
    generator = torch.Generator()
    for block, start in enumerate(range(0, numel, _MASK_BLOCK)):
        key = hashlib.sha256(f"{seed}:{stream}:{block}".encode()).digest()
        generator.manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
        count = min(_MASK_BLOCK, numel - start)
        mask[start : start + count] = torch.rand(count, generator=generator) < density
    return mask.reshape(shape)


def random_drop(delta: Tensor, density: float, seed: int, stream: int, rescale: str) -> Tensor:
    """DARE: drop each entry with probability ``1 - density`` and rescale the survivors.

    ``rescale``: ``inverse_density`` multiplies by ``1 / density`` (the DARE paper, keeps the
    expectation); ``l1`` restores the L1 norm of ``delta`` (mergekit's default); ``none`` keeps
    the survivors as they are. Returns a new tensor.
    """
    if rescale not in ("inverse_density", "l1", "none"):
        raise ValueError(f"unknown rescale '{rescale}'; use inverse_density, l1 or none")
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    dropped = delta * keep_mask(delta.shape, density, seed, stream)
    if rescale == "inverse_density":
        return dropped / density
    if rescale == "l1":
        before, after = delta.abs().sum(), dropped.abs().sum()
        return dropped if before < 1e-7 or after < 1e-7 else dropped * (before / after)
    return dropped


def sign_consensus_merge(deltas: list[Tensor], weight: Sequence[float], normalize: bool) -> Tensor:
    """TIES steps 2-3: elect each entry's sign by the weighted sum, then average the agreeing entries.

    Args:
        deltas: trimmed (or dropped) task vectors, each of shape ``S``. They are scaled by their
            weights in place (callers pass tensors they own; this saves one copy per model).
        weight: one weight per task vector.
        normalize: divide by the summed weights of the agreeing entries (TIES' disjoint mean);
            False sums them.

    Returns:
        the merged task vector, shape ``S``.
    """
    for delta, w in zip(deltas, weight):
        delta.mul_(w)
    elected = torch.zeros_like(deltas[0])
    for delta in deltas:
        elected.add_(delta)
    elected_sign = torch.where(elected >= 0, 1.0, -1.0).to(elected.dtype)
    del elected
    merged = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0]) if normalize else None
    for delta, w in zip(deltas, weight):
        agrees = torch.sign(delta) == elected_sign  # zeros never join
        merged.add_(torch.where(agrees, delta, 0.0))
        if divisor is not None:
            divisor.add_(agrees.to(divisor.dtype), alpha=w)
    if divisor is not None:
        divisor[divisor == 0] = 1
        merged.div_(divisor)
    return merged


__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "keep_mask",
    "magnitude_trim",
    "merge_method",
    "random_drop",
    "sign_consensus_merge",
    "work_dtype",
]
