"""DoRA baseline (Liu et al. 2024) through PEFT: ``peft.LoraConfig(use_dora=True)``.

Weight-decomposed LoRA: the update is split into a magnitude vector and a LoRA-updated direction.
Like sequential LoRA, by default each stage's adapter is merged into the model
(``merge_and_unload``) and a fresh one starts the next; ``keep_adapter: true`` trains one adapter
across stages. A stage saves a PEFT adapter folder (``PeftModel.from_pretrained`` loads it).
"""

from __future__ import annotations

from pydantic import Field

from forgetless.adapters import MLP_PROJECTIONS
from forgetless.strategies import Strategy, StrategyParams, register_strategy
from forgetless.strategies._engines import DoraEngine, Engine


class DoRAParams(StrategyParams):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(
        default_factory=lambda: list(MLP_PROJECTIONS), min_length=1, description="module names to adapt"
    )
    keep_adapter: bool = Field(
        False, description="train one adapter across stages instead of merging and starting a new one"
    )


@register_strategy("dora")
class DoRA(Strategy):
    """PEFT DoRA, sequential."""

    Params = DoRAParams

    def make_engine(self) -> Engine:
        fields = dict(
            r=self.params.r,
            lora_alpha=self.params.alpha,
            lora_dropout=self.params.dropout,
            target_modules=list(self.params.target_modules),
        )
        return DoraEngine(fields, "continue" if self.params.keep_adapter else "merge")
