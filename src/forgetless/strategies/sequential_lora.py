"""Sequential LoRA: one LoRA adapter per stage, merged into the model before the next (paper 2).

By default as the paper's code does it: after each stage the adapter is folded into the base
weights (``W <- W + s B A``) and a fresh adapter starts the next stage, so stage i trains on top of
everything learned before. ``keep_adapter: true`` instead trains one adapter across all stages.
"""

from __future__ import annotations

from pydantic import Field

from forgetless.strategies import Strategy, StrategyParams, register_strategy
from forgetless.strategies._engines import AdapterEngine, Engine


class SequentialLoRAParams(StrategyParams):
    keep_adapter: bool = Field(
        False, description="train one adapter across stages instead of merging and starting a new one"
    )


@register_strategy("sequential_lora")
class SequentialLoRA(Strategy):
    """LoRA task after task; params also take AdapterConfig fields (r, alpha, target_modules, dropout)."""

    Params = SequentialLoRAParams
    accepts_adapter_fields = True

    def make_engine(self) -> Engine:
        continuation = "continue" if self.params.keep_adapter else "merge"
        return AdapterEngine("lora", self.adapter_fields, continuation, source=self.source)
