"""Joint training (paper 2, fully-cooperative setting): all tasks so far at once, from the base.

Stage t trains a fresh model (LoRA adapter or all weights) on tasks 1..t together; every task is
upsampled to the largest one's size so that a training example is equally likely to come from any
task (the paper's "uniform probability of selection across all datasets"). Row t of the accuracy
matrix is then "joint training on the first t tasks", comparable with the sequential rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from forgetless.data.task import Example, Task
from forgetless.strategies import ModeParams, Strategy, register_strategy
from forgetless.strategies._base import mode_engine
from forgetless.strategies._engines import Engine
from forgetless.training.sampling import joint_mixture


@register_strategy("joint")
class Joint(Strategy):
    """Joint training; params: mode (lora | fft) and AdapterConfig fields for mode lora."""

    setting_required = "fully_cooperative"
    Params = ModeParams
    accepts_adapter_fields = True

    def make_engine(self) -> Engine:
        return mode_engine(self, lora="from_base", fft="from_base")

    def stage_data(self, stage: int, tasks: Sequence[Task], seed: int) -> list[tuple[Task, list[Example]]]:
        mixture = joint_mixture([task.train for task in tasks], stage, seed)
        return [(tasks[index], examples) for index, examples in mixture]

    def data_tasks(self, stage: int) -> list[int]:
        return list(range(stage + 1))
