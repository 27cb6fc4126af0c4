"""Routing diagnostics: where the tokens of given inputs go, layer by layer.

For every mixture layer (moe_lora / slim): the share of routing weight given to identity experts
(``identity_share``; 1 means the token sees the base layer only), the share of tokens routed to
identity experts alone (``identity_tokens``), the load of each expert (share of the top-K slots),
and statistics and a histogram of the calibrated distance ``d(x)``. Padding tokens are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from forgetless.adapters.inject import adapter_layers
from forgetless.adapters.slim import MixtureLinear
from forgetless.errors import InputError

_HISTOGRAM_BINS = 20


class _LayerTally:
    """Running sums for one layer over all batches."""

    def __init__(self, num_lora: int, num_total: int) -> None:
        self.num_lora = num_lora
        self.tokens = 0
        self.identity_weight = 0.0
        self.identity_only = 0
        self.slots = torch.zeros(num_total, dtype=torch.long)
        self.distances: list[Tensor] = []
        self.statistics_mask: Tensor | None = None  # (tokens,) bool for the current batch, or None

    def __call__(
        self,
        layer: MixtureLinear,
        weights: Tensor,
        chosen: Tensor,
        distance: Tensor | None,
        mask: Tensor | None,
    ) -> None:
        extra = self.statistics_mask
        if extra is not None and extra.shape[0] == weights.shape[0]:
            mask = extra.to(weights.device) if mask is None else mask & extra.to(mask.device)
        if mask is not None:
            weights, chosen = weights[mask], chosen[mask]
            distance = None if distance is None else distance[mask]
        self.tokens += weights.shape[0]
        self.identity_weight += float(weights[:, self.num_lora :].sum())
        self.identity_only += int((chosen >= self.num_lora).all(dim=1).sum())
        self.slots += torch.bincount(chosen.reshape(-1).cpu(), minlength=len(self.slots))
        if distance is not None:
            self.distances.append(distance.detach().float().cpu())

    def summary(self) -> dict[str, Any]:
        tokens = max(self.tokens, 1)
        result: dict[str, Any] = {
            "tokens": self.tokens,
            "identity_share": self.identity_weight / tokens,
            "identity_tokens": self.identity_only / tokens,
            "expert_load": (self.slots.float() / self.slots.sum().clamp_min(1)).tolist(),
        }
        if self.distances:
            values = torch.cat(self.distances)
            quantiles = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9])).tolist()
            counts = torch.histc(
                values, bins=_HISTOGRAM_BINS, min=float(values.min()), max=float(values.max())
            )
            result["distance"] = {
                "mean": float(values.mean()),
                "std": float(values.std()) if len(values) > 1 else 0.0,
                "min": float(values.min()),
                "p10": quantiles[0],
                "median": quantiles[1],
                "p90": quantiles[2],
                "max": float(values.max()),
                "histogram": {
                    "min": float(values.min()),
                    "max": float(values.max()),
                    "counts": [int(c) for c in counts.tolist()],
                },
            }
        return result


def separation_auc(negative: Tensor, positive: Tensor) -> float:
    """ROC AUC of "a positive value is larger than a negative one" (Mann-Whitney U), ties counted
    half: how well a distance tells general inputs (positive) from in-domain ones. 0.5 = none.

    Rank-based (n log n), with average ranks for tied values: token distances tie exactly where
    prompts share a prefix (causal attention gives those tokens bit-identical hidden states).
    """
    if not len(negative) or not len(positive):
        raise ValueError("separation_auc needs at least one value on each side")
    values = torch.cat([negative.reshape(-1), positive.reshape(-1)]).double()
    _, inverse, counts = values.unique(return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based average rank of every value
    n, m = negative.numel(), positive.numel()
    return float((ranks[n:].sum() - m * (m + 1) / 2) / (n * m))


def _as_kwargs(batch: Mapping[str, Tensor] | Tensor, device: torch.device) -> dict[str, Tensor]:
    if isinstance(batch, Tensor):
        return {"input_ids": batch.to(device)}
    keep = ("input_ids", "attention_mask", "inputs_embeds")
    return {key: value.to(device) for key, value in batch.items() if key in keep and value is not None}


def routing_diagnostics(model: nn.Module, batches: Iterable[Mapping[str, Tensor] | Tensor]) -> dict[str, Any]:
    """Run ``batches`` through ``model`` (eval mode, no gradients) and summarise the routing.

    Args:
        batches: token id tensors (B x T) or dicts with ``input_ids`` / ``inputs_embeds`` and
            optionally ``attention_mask`` (padding is left out of every statistic) and
            ``statistics_mask`` (B x T, counts only these tokens, e.g. not a shared chat template).

    Returns:
        ``{"identity_share", "identity_tokens", "tokens", "layers": {module: {...}}}`` where each
        layer has ``tokens``, ``identity_share``, ``identity_tokens``, ``expert_load`` (E_l + E_id
        shares of the top-K slots, LoRA experts first) and, with clustering, ``distance`` stats and
        a histogram; the top-level shares are means over layers. With sample-level yielding also
        ``sequences``, the mean ``gate_score`` and the share of ``yielded_sequences`` (score at
        or above the threshold: base model, no expert work). The model's mode is restored.

    Raises:
        InputError: the model has no mixture adapters (moe_lora / slim).
    """
    layers = {name: layer for name, layer in adapter_layers(model).items() if layer.routed}
    if not layers:
        raise InputError(
            "the model has no moe_lora or slim adapters; routing diagnostics need a routed adapter"
        )
    tallies = {
        name: _LayerTally(layer.config.num_experts, layer.config.num_total_experts)
        for name, layer in layers.items()
    }
    was_training = model.training
    device = next(iter(layers.values())).lora_A.device
    first = next(iter(layers.values()))
    gate = first.context.gate if first.config.uses_sample_gate else None
    scores: list[Tensor] = []
    try:
        model.eval()
        for name, layer in layers.items():
            layer.recorder = tallies[name]
        with torch.no_grad():
            for batch in batches:
                statistics_mask = batch.get("statistics_mask") if isinstance(batch, Mapping) else None
                for tally in tallies.values():
                    tally.statistics_mask = (
                        None if statistics_mask is None else statistics_mask.reshape(-1).bool()
                    )
                model(**_as_kwargs(batch, device))
                if gate is not None and gate.scores is not None:
                    scores.append(gate.scores.detach().float().cpu())
    finally:
        for layer in layers.values():
            layer.recorder = None
        model.train(was_training)
    per_layer = {name: tally.summary() for name, tally in tallies.items()}
    count = len(per_layer)
    result = {
        "identity_share": sum(layer["identity_share"] for layer in per_layer.values()) / count,
        "identity_tokens": sum(layer["identity_tokens"] for layer in per_layer.values()) / count,
        "tokens": next(iter(per_layer.values()))["tokens"],
        "layers": per_layer,
    }
    if scores:  # sample-level yielding: one gate score per sequence
        values = torch.cat(scores)
        result["sequences"] = int(values.numel())
        result["gate_score"] = float(values.mean())
        result["yielded_sequences"] = float((values >= first.config.yield_threshold).float().mean())
    return result
