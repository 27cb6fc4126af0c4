"""Sequential full fine-tuning: all weights train, each stage starts from the previous stage's model.

The paper's FFT baseline (semi-cooperative): the most plastic and, on its measurements, the most
forgetful. A stage saves the whole model as a safetensors Hugging Face folder.
"""

from __future__ import annotations

from forgetless.strategies import Strategy, StrategyParams, register_strategy
from forgetless.strategies._engines import Engine, FullModelEngine


@register_strategy("sequential_fft")
class SequentialFFT(Strategy):
    """Train every weight on task 1, then task 2 from there, and so on."""

    Params = StrategyParams

    def make_engine(self) -> Engine:
        return FullModelEngine("continue")
