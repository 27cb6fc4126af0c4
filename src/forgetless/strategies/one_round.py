"""One-round training (paper 2): every task trained from the base model on its own.

The outputs are the *inputs* of model merging and MoE mixing, not a continual model: stage i's
artifact is task i's adapter (``mode: lora``, a PEFT-loadable folder) or fine-tuned model
(``mode: fft``). ``run_strategy`` lists each artifact folder in its ``StageResult``; the runner
merges or mixes the artifacts of tasks 1..i to get row i of a merge/mix method's accuracy matrix.
The ``on_stage_end`` callback receives the per-task model of task i (only task i's knowledge).
"""

from __future__ import annotations

from forgetless.strategies import ModeParams, Strategy, register_strategy
from forgetless.strategies._base import mode_engine
from forgetless.strategies._engines import Engine


@register_strategy("one_round")
class OneRound(Strategy):
    """One model or adapter per task, each from the base; params: mode (lora | fft), adapter fields."""

    Params = ModeParams
    accepts_adapter_fields = True

    def make_engine(self) -> Engine:
        return mode_engine(self, lora="from_base", fft="from_base")

    def _produces(self) -> str:
        return "per_task"
