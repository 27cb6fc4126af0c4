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
from collections.abc import Callable, Iterator, Sequence
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


def check_inputs(tensors: Sequence[Tensor], per_model: dict[str, Sequence[float]]) -> None:
    """Internal invariants (config validation has already told the user about real mistakes)."""
    if len(tensors) == 0:
        raise ValueError("merging needs at least one input tensor")
    for key, values in per_model.items():
        if len(values) != len(tensors):
            raise ValueError(f"{key} has {len(values)} values for {len(tensors)} input tensors")


def each_input(tensors: Sequence[Tensor], shape: torch.Size | None, dtype: torch.dtype) -> Iterator[Tensor]:
    """The inputs one at a time, shape-checked and in the work dtype.

    Methods touch every input exactly once through this generator, so a caller may pass a lazy
    sequence that reads each tensor from disk on access: the input is freed as soon as the
    method has turned it into what it keeps (a trimmed delta, a running sum).
    """
    for index in range(len(tensors)):
        tensor = tensors[index]
        if shape is not None and tensor.shape != shape:
            raise ValueError(
                f"shape mismatch: input {index} has {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        yield tensor.to(dtype)


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th largest entry of the 1-D tensor ``values`` (exact), as a 0-d tensor.

    A full selection over tens of millions of entries costs about a second on two cores, so for
    large tensors we first bracket the answer with quantiles of a fixed strided sample, count
    what lies above the bracket, and select inside the bracket only (a few percent of the
    entries). If the bracket misses (it cannot for a fair sample, but values are arbitrary) we
    fall back to the full selection. The sample is strided, not random: same input, same work.
    """
    count = values.numel()
    if count <= 1 << 20:
        return torch.kthvalue(values, count - k + 1).values
    sample = values[:: count // 65536].sort().values
    position = (count - k) / count * (sample.numel() - 1)  # where the answer sits in the sample
    margin = 0.02 * sample.numel()
    low = sample[max(0, int(position - margin))]
    high = sample[min(sample.numel() - 1, int(position + margin) + 1)]
    above = int(torch.count_nonzero(values > high))
    band = values[(values >= low) & (values <= high)]
    need = k - above  # rank of the answer from the top inside the band
    if 1 <= need <= band.numel():
        return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(values, count - k + 1).values


def magnitude_trim_(delta: Tensor, density: float) -> Tensor:
    """Keep the ``k = max(1, int(density * numel))`` largest-magnitude entries of ``delta`` in place.

    TIES step 1 ("trim"); mergekit's ``k``. Exactly ``k`` entries survive; among entries of equal
    magnitude at the cut the lower flat index wins, so the result is deterministic (mergekit's
    unstable sort picks among such ties arbitrarily). Returns ``delta``.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    if not delta.is_contiguous():
        return delta.copy_(magnitude_trim_(delta.contiguous(), density))
    flat = delta.view(-1)
    k = max(1, int(density * flat.numel()))
    magnitude = flat.abs()
    threshold = kth_largest(magnitude, k)
    # the keep mask is built in the magnitude buffer as 1.0 / 0.0: no new allocation, and a
    # float-by-float product is several times faster than multiplying by a bool mask
    keep = magnitude.ge_(threshold)
    extra = int(torch.count_nonzero(keep)) - k
    if extra > 0:  # several entries equal the threshold: drop those with the highest indices
        ties = (flat.abs() == threshold).nonzero().squeeze(1)
        keep[ties[ties.numel() - extra :]] = 0
    flat.mul_(keep)
    return delta


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """``magnitude_trim_`` on a copy."""
    return magnitude_trim_(delta.clone(), density)


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


def random_drop_(delta: Tensor, density: float, seed: int, stream: int, rescale: str) -> Tensor:
    """DARE, in place: drop each entry with probability ``1 - density`` and rescale the survivors.

    ``rescale``: ``inverse_density`` multiplies by ``1 / density`` (the DARE paper, keeps the
    expectation); ``l1`` restores the L1 norm of ``delta`` (mergekit's default); ``none`` keeps
    the survivors as they are. Returns ``delta``.
    """
    if rescale not in ("inverse_density", "l1", "none"):
        raise ValueError(f"unknown rescale '{rescale}'; use inverse_density, l1 or none")
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    before = delta.abs().sum() if rescale == "l1" else None
    delta.mul_(keep_mask(delta.shape, density, seed, stream))
    if rescale == "inverse_density":
        return delta.div_(density)
    if before is not None:
        after = delta.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            delta.mul_(before / after)
    return delta


def random_drop(delta: Tensor, density: float, seed: int, stream: int, rescale: str) -> Tensor:
    """``random_drop_`` on a copy."""
    return random_drop_(delta.clone(), density, seed, stream, rescale)


def sign_consensus_merge(deltas: list[Tensor], weight: Sequence[float], normalize: bool) -> Tensor:
    """TIES steps 2-3: elect each entry's sign by the weighted sum, then average the agreeing entries.

    Args:
        deltas: trimmed (or dropped) task vectors, each of shape ``S``. They are consumed: scaled
            in place and released (callers pass tensors they own; this saves a copy per model).
        weight: one weight per task vector.
        normalize: divide by the summed weights of the agreeing entries (TIES' disjoint mean);
            False sums them.

    Returns:
        the merged task vector, shape ``S``.
    """
    weights = list(weight)
    for delta, w in zip(deltas, weights):
        if w != 1:  # x * 1 == x: skip a pass over the tensor for the common unit weight
            delta.mul_(w)
    sign = deltas[0].clone()  # 0 + d_0 is d_0: the same sum as accumulating from zeros
    for delta in deltas[1:]:
        sign.add_(delta)
    sign.sign_().add_(0.5).sign_()  # elected sign: +1 where the sum is >= 0 (as in mergekit), else -1
    merged: Tensor | None = None
    divisor: Tensor | None = None
    while deltas:
        delta, w = deltas.pop(0), weights.pop(0)
        # s * d > 0 exactly where the entry agrees with the elected sign (zeros never agree);
        # summing relu(s * d) and multiplying by s at the end is the sum of the agreeing entries,
        # bit for bit (multiplying by +-1 is exact).
        delta.mul_(sign)
        if normalize:
            agrees = (delta > 0).to(delta.dtype)
            divisor = agrees.mul_(w) if divisor is None else divisor.add_(agrees, alpha=w)
            del agrees
        delta.clamp_(min=0)
        merged = delta if merged is None else merged.add_(delta)
        del delta
    assert merged is not None
    merged.mul_(sign)
    if divisor is not None:
        divisor.masked_fill_(divisor == 0, 1)
        merged.div_(divisor)
    return merged


__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "each_input",
    "keep_mask",
    "kth_largest",
    "magnitude_trim",
    "magnitude_trim_",
    "merge_method",
    "random_drop",
    "random_drop_",
    "sign_consensus_merge",
    "work_dtype",
]
