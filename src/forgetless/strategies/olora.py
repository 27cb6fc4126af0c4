"""O-LoRA (Wang et al. 2023, as used in paper 2): a new LoRA per task, orthogonal to the earlier ones.

Loss of stage t: ``CE + lambda * sum_modules sum_{i<t} || A_i A_t^T ||_F^2`` with A (r x d_in) the
down-projection of each adapter (the paper's ``O_{i,t} = A_i^T A_t`` with A stored d_in x r).
Earlier adapters stay frozen and active; folding them into the frozen base weights gives the same
forward, so we merge them (as sequential LoRA does) and keep only their A factors for the penalty.
``lambda`` defaults to 0.5: the paper finds small weights (<= 0.5) the better trade-off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from forgetless.strategies import Strategy, StrategyParams, register_strategy
from forgetless.strategies._engines import AdapterEngine, Engine, ModelSource
from forgetless.strategies.context import TrainBatch


def orthogonality_penalty(previous: Tensor, current: Tensor) -> Tensor:
    """``sum_i || A_i A_t^T ||_F^2`` for one module.

    Args:
        previous: the earlier adapters' A factors stacked along rows, (sum_i r_i, d_in).
        current: the current adapter's A, (r, d_in).

    Returns:
        A scalar: stacking rows makes ``previous @ current.T`` the blocks ``A_i A_t^T`` on top of
        each other, and a Frobenius norm squared sums over blocks.
    """
    return (previous.to(current.dtype) @ current.T).pow(2).sum()


class OLoRAParams(StrategyParams):
    orthogonal_weight: float = Field(
        0.5, ge=0, alias="lambda", description="lambda: weight of the orthogonality penalty (paper: <= 0.5)"
    )


@register_strategy("olora")
class OLoRA(Strategy):
    """O-LoRA; params: ``lambda`` and AdapterConfig fields of the LoRA (r, alpha, target_modules ...)."""

    Params = OLoRAParams
    accepts_adapter_fields = True

    def __init__(self, params: dict[str, Any] | None = None, source: str = "params") -> None:
        self._collected: dict[str, list[Tensor]] = {}
        self._previous: dict[str, Tensor] = {}
        super().__init__(params, source)

    def make_engine(self) -> Engine:
        return AdapterEngine(
            "lora", self.adapter_fields, "merge", on_previous=self._remember, source=self.source
        )

    def _remember(self, model: nn.Module, folder: Path) -> None:
        from forgetless.adapters import lora_factors

        for name, (a, _, _) in lora_factors(model).items():
            self._collected.setdefault(name, []).append(a.detach().clone())

    def build(self, stage: int, source: ModelSource, previous: list[Path], seed: int) -> nn.Module:
        self._collected = {}
        model = super().build(stage, source, previous, seed)
        self._previous = {name: torch.cat(factors, dim=0) for name, factors in self._collected.items()}
        return model

    def extra_loss(self, model: nn.Module, batch: TrainBatch | None = None) -> Tensor | None:
        """``lambda * sum_modules orthogonality_penalty(A_<t, A_t)``; None in the first stage."""
        if not self._previous or self.params.orthogonal_weight == 0:
            return None
        from forgetless.adapters import lora_factors

        terms = []
        for name, (a, _, _) in lora_factors(model).items():
            stacked = self._previous[name]
            if stacked.device != a.device:
                stacked = self._previous[name] = stacked.to(a.device)
            terms.append(orthogonality_penalty(stacked, a))
        return self.params.orthogonal_weight * torch.stack(terms).sum()
