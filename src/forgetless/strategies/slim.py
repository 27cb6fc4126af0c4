"""SLIM (the steps in ``forgetless.adapters.slim``'s docstring): one SLIM adapter trained stage after stage.

A mixture of LoRA experts and identity experts with a router corrected by sliding clustering, an
L1 penalty and a load-balancing loss (both from ``adapter_regularization``, weighted by the
adapter's ``l1_weight`` and ``balance_weight``). The adapter is kept across stages (a routed
mixture does not fold into one weight); stage i continues from stage i-1's adapter, cluster
statistics included. Params are AdapterConfig fields (r, num_experts, top_k, yield_scale,
mask_ratio, l1_weight ...), with SLIM's defaults.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from forgetless.strategies import Strategy, StrategyParams, register_strategy
from forgetless.strategies._engines import AdapterEngine, Engine
from forgetless.strategies.context import TrainBatch


@register_strategy("slim")
class SLIM(Strategy):
    """SLIM adapter, continued task after task, with its L1 and balance losses."""

    Params = StrategyParams
    accepts_adapter_fields = True
    adapter_kind = "slim"
    #: AdapterConfig fields this strategy sets unless its params do (a named variant of a kind)
    adapter_defaults: ClassVar[dict[str, Any]] = {}

    def adapter_settings(self) -> dict[str, Any]:
        """The AdapterConfig fields of this strategy's adapter: its defaults, then its params."""
        return {**self.adapter_defaults, **self.adapter_fields}

    def make_engine(self) -> Engine:
        return AdapterEngine(self.adapter_kind, self.adapter_settings(), "continue", source=self.source)

    def extra_loss(self, model: nn.Module, batch: TrainBatch | None = None) -> Tensor | None:
        from forgetless.adapters import adapter_regularization

        return adapter_regularization(model)
