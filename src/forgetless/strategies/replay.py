"""Sequential training with replay (paper 2, fully-cooperative setting).

Stage t trains on task t plus, from *each* earlier task, a random ``fraction`` (default 10 %) of
task t's training size, upsampled when the earlier task is shorter; the model continues from stage
t-1 as in sequential LoRA (``mode: lora``, merge and new adapter) or sequential FFT (``mode: fft``).
Needs the old data, so only in the fully-cooperative setting.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from forgetless.data.task import Example, Task
from forgetless.strategies import ModeParams, Strategy, register_strategy
from forgetless.strategies._base import mode_engine
from forgetless.strategies._engines import Engine
from forgetless.training.sampling import replay_mixture


class ReplayParams(ModeParams):
    fraction: float = Field(
        0.1, gt=0, le=10, description="share of the current task's size drawn from each earlier task"
    )


@register_strategy("replay")
class Replay(Strategy):
    """Replay; params: fraction, mode (lora | fft), and AdapterConfig fields for mode lora."""

    setting_required = "fully_cooperative"
    Params = ReplayParams
    accepts_adapter_fields = True

    def make_engine(self) -> Engine:
        return mode_engine(self, lora="merge", fft="continue")

    def stage_data(self, stage: int, tasks: Sequence[Task], seed: int) -> list[tuple[Task, list[Example]]]:
        mixture = replay_mixture([task.train for task in tasks], stage, self.params.fraction, seed)
        return [(tasks[index], examples) for index, examples in mixture]

    def data_tasks(self, stage: int) -> list[int]:
        return list(range(stage + 1))
