"""The ``Strategy`` base class: validated params, the stage's training data, and hooks into the loop.

A strategy is a small class registered by name in ``STRATEGIES``. It is constructed from a
``params`` mapping, validated by its own pydantic ``Params`` model (unknown keys are one
``InputError`` with a "Did you mean"), and picks an engine (``_engines.py``) that builds, saves
and reloads the model of each stage. The hooks the runner calls, in order, for stage i:

    strategy.stage_data(i, tasks, seed)       -> [(task, examples), ...] to train on
    strategy.build(i, source, previous, seed) -> the model to train (previous = earlier artifacts)
    strategy.before_training(context)         -> once, before the first step (a StageContext)
    strategy.extra_loss(model, batch)         -> a scalar added to the loss each micro-batch, or None
    strategy.before_step(model, step)         -> each optimizer step, gradients complete (A-GEM)
    strategy.after_step(model, step)          -> each optimizer step, after it (I-LoRA's EMA)
    strategy.after_training(context)          -> once, after the last step (state for later stages)
    strategy.checkpoint_tensors()             -> live tensors it keeps mid-stage (saved with checkpoints)
    strategy.save(model, folder, source)      -> the stage artifact (adapter or full model folder)
    strategy.load(i, source, artifacts)       -> the model after stage i, from artifacts alone

``context.py`` says what a ``StageContext`` holds and how a strategy persists state between stages.

Class attributes read before construction: ``setting_required`` ("any" or "fully_cooperative").
Instance attributes: ``produces`` ("model" | "adapter" | "per_task"), ``default_lr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from forgetless.data.task import Example, Task
from forgetless.errors import InputError
from forgetless.registry import did_you_mean
from forgetless.strategies._engines import Engine, ModelSource
from forgetless.strategies.context import StageContext, TrainBatch

# AdapterConfig fields a strategy's params may set directly (``r``, ``alpha``, ``num_experts`` ...);
# ``kind`` is the strategy's choice and ``seed`` comes from the training seed and the stage.
_NOT_ADAPTER_PARAMS = {"kind", "seed"}


class StrategyParams(BaseModel):
    """Base of every strategy's ``Params``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModeParams(StrategyParams):
    """Params of strategies that train either LoRA adapters or all weights."""

    mode: Literal["lora", "fft"] = Field(
        "lora", description="lora: a LoRA adapter (r, alpha, target_modules ...); fft: all weights"
    )


def adapter_field_names() -> list[str]:
    from forgetless.adapters import AdapterConfig

    return sorted(set(AdapterConfig.model_fields) - _NOT_ADAPTER_PARAMS)


class Strategy:
    """Base class; subclasses set ``Params`` and implement ``make_engine``."""

    name: ClassVar[str] = ""
    setting_required: ClassVar[str] = "any"
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    #: whether params may also carry AdapterConfig fields (r, alpha, target_modules, ...)
    accepts_adapter_fields: ClassVar[bool] = False
    produces: str = "adapter"

    def __init__(self, params: dict[str, Any] | None = None, source: str = "params") -> None:
        self.source = source
        self.params, self.adapter_fields = self._parse(dict(params or {}))
        self.engine: Engine = self.make_engine()
        self.produces = self._produces()

    # ---- params --------------------------------------------------------------------------------

    def _parse(self, raw: dict[str, Any]) -> tuple[StrategyParams, dict[str, Any]]:
        fields = self.Params.model_fields
        own = set(fields) | {info.alias for info in fields.values() if info.alias}
        allowed_adapter = adapter_field_names() if self.accepts_adapter_fields else []
        adapter = {key: raw.pop(key) for key in list(raw) if key in allowed_adapter and key not in own}
        unknown = [key for key in raw if key not in own]
        if unknown:
            valid = sorted(own | set(allowed_adapter))
            raise InputError(
                f"{self.source}: unknown parameter '{unknown[0]}' for strategy '{self.name}'."
                f"{did_you_mean(unknown[0], valid)} Valid parameters: {', '.join(valid) or 'none'}"
            )
        try:
            params = self.Params.model_validate(raw)
        except ValidationError as error:
            from forgetless.validation import explain

            raise InputError(f"{explain(error, self.source, self.Params)} (strategy '{self.name}')") from None
        return params, adapter

    def make_engine(self) -> Engine:
        raise NotImplementedError  # each registered strategy picks its engine

    def _produces(self) -> str:
        return "model" if self.engine.artifact == "model" else "adapter"

    @property
    def default_lr(self) -> float:
        return self.engine.default_lr

    def describe(self) -> dict[str, Any]:
        """Name and every param value (defaults included), as recorded in each stage's done.json."""
        return {
            "strategy": self.name,
            "params": {**self.params.model_dump(by_alias=True), **self.adapter_fields},
        }

    # ---- hooks -----------------------------------------------------------------------------------

    def stage_data(self, stage: int, tasks: Sequence[Task], seed: int) -> list[tuple[Task, list[Example]]]:
        """The training examples of ``stage``, grouped by the task they come from (default: task ``stage``)."""
        return [(tasks[stage], list(tasks[stage].train))]

    def data_tasks(self, stage: int) -> list[int]:
        """Indices of the tasks whose data stage ``stage`` reads (keys the stage's fingerprint)."""
        return [stage]

    def build(self, stage: int, source: ModelSource, previous: list[Path], seed: int) -> nn.Module:
        """The model to train in ``stage``; ``previous`` are the artifact folders of stages 0..stage-1."""
        return self.engine.build(stage, source, previous, seed + stage)

    def before_training(self, context: StageContext) -> None:
        """Called once the stage's model is built and its data encoded, before any step (and again
        before a resumed stage's checkpoint is read: depend on the model and data only)."""

    def extra_loss(self, model: nn.Module, batch: TrainBatch | None = None) -> Tensor | None:
        """A scalar added to the answer loss after each forward (None: nothing); ``batch`` is the
        micro-batch with the model's logits at its answer positions."""
        return None

    def before_step(self, model: nn.Module, step: int) -> None:
        """Called each optimizer step (0-based ``step``) after the step's backward passes, before
        gradient clipping: a method that edits gradients (projection, masking) does it here. Draw
        randomness from a generator seeded with the step, so a resumed stage draws the same."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called each optimizer step right after it, before a checkpoint is written: a method
        that averages or copies weights (an EMA of the trained weights) does it here."""

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Live tensors the strategy updates during a stage outside the model (say, slow weights):
        saved with every mid-stage checkpoint and copied back in place on resume."""
        return {}

    def after_training(self, context: StageContext) -> None:
        """Called once after the stage's last step, before its artifact is saved: what later
        stages need goes to ``context.save_state``."""

    def save(self, model: nn.Module, folder: Path, source: ModelSource) -> None:
        self.engine.save(model, folder, source)

    def load(self, stage: int, source: ModelSource, artifacts: list[Path]) -> nn.Module:
        """The model after ``stage``, rebuilt from the artifact folders of stages 0..stage."""
        return self.engine.load(stage, source, artifacts)


def lora_engine_fields(strategy: Strategy) -> dict[str, Any]:
    """The adapter fields for a LoRA engine; with ``mode: fft`` any adapter field is an error."""
    mode = getattr(strategy.params, "mode", "lora")
    if mode == "fft" and strategy.adapter_fields:
        first = next(iter(strategy.adapter_fields))
        raise InputError(
            f"{strategy.source}: '{first}' is an adapter setting but mode is fft; remove it or set mode: lora"
        )
    return strategy.adapter_fields


def mode_engine(strategy: Strategy, lora: str, fft: str) -> Engine:
    """The engine of a ``ModeParams`` strategy: a LoRA adapter with continuation ``lora`` for mode
    lora, all weights with continuation ``fft`` for mode fft (where an adapter field is an error)."""
    from forgetless.strategies._engines import AdapterEngine, FullModelEngine

    fields = lora_engine_fields(strategy)
    if strategy.params.mode == "fft":
        return FullModelEngine(fft)
    return AdapterEngine("lora", fields, lora, source=strategy.source)
