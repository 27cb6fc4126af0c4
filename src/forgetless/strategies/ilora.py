"""I-LoRA: interpolation-based LoRA with a fast and a slow learner (Ren et al. 2024, arXiv 2402.18865).

Two LoRA learners on the same modules, as in a dual-memory replay method (CLS-ER). The fast
learner (working memory, the adapter the optimizer trains) learns the current task mixed with
replayed examples of earlier tasks; after every optimizer step the slow learner (long-term
memory) moves towards it by interpolation::

    theta_slow <- lambda * theta_slow + (1 - lambda) * theta_fast        (an EMA, lambda ~ 1)

and a consistency term pulls the fast learner's final-layer hidden states on the *replayed* rows
towards the slow learner's::

    L = CE(fast; current + replayed) + gamma * MSE(h_fast(x_replay), h_slow(x_replay))

``h`` is the last entry of ``output_hidden_states`` (after the final norm) at the real tokens
of each replayed row (padding left out); the slow learner runs without gradient, in eval mode.
Only replayed rows are regularised, as the paper's buffer samples are: the term protects what the
slow learner knows of *earlier* tasks and leaves the fast learner free on the new one (stage 0
has no replay, hence no term and no extra cost).

Data: the current task plus, from each earlier task, ``fraction`` of its size, as ``replay``
does (``replay_mixture``); so only in the fully-cooperative setting.

Stages: one adapter continued across stages. The stage's artifact is the **slow learner**, so
stage t+1 is built from stage t's slow weights; the fast learner is carried on from its own end
weights (saved in ``state/`` as ``fast.<name>``), so both learners run one continuous stream over
the task sequence as in the paper. A checkpoint keeps the fast learner (the model's trainable
tensors) and the slow learner (``checkpoint_tensors``): a resumed stage ends as an uninterrupted
one does.

Defaults: ``interpolation`` 0.99 (the paper's text was not at hand; the authors' code
which47/LLMCL uses 0.25 with a 1 - 1/(step+1) warm-up, an EMA that nearly follows the fast
learner); ``consistency_weight`` 1.0, the authors' code's ``reg_weight``: final-norm states are
O(1) per dimension, so the MSE is on the scale of the cross-entropy.

Cost: one more copy of the adapter (the slow weights) in memory and in each checkpoint, one in
``state/``; an adapter-sized EMA per optimizer step; per micro-batch with replayed rows, a second
forward and backward of the fast model and a no-grad forward of the slow one, on those rows only
(a ``fraction * t / (1 + fraction * t)`` share of stage t's rows: ~9 % at stage 1 by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from forgetless.data.task import Example, Task
from forgetless.errors import InputError
from forgetless.strategies import Strategy, StrategyParams, register_strategy
from forgetless.strategies._engines import AdapterEngine, Engine
from forgetless.strategies.context import STATE_DIR, StageContext, TrainBatch, snapshot, trainable_named
from forgetless.training.sampling import replay_mixture

FAST = "fast."


class ILoRAParams(StrategyParams):
    interpolation: float = Field(
        0.99, gt=0, lt=1, description="lambda: share of the slow learner kept at each EMA step"
    )
    consistency_weight: float = Field(
        1.0, ge=0, description="gamma: weight of the hidden-state MSE on replayed rows"
    )
    fraction: float = Field(
        0.1, gt=0, le=10, description="share of the current task's size drawn from each earlier task"
    )


@torch.no_grad()
def interpolate(slow: dict[str, Tensor], fast: dict[str, Tensor], interpolation: float) -> None:
    """In place: ``slow[n] <- interpolation * slow[n] + (1 - interpolation) * fast[n]``."""
    for name, tensor in slow.items():
        tensor.mul_(interpolation).add_(fast[name].detach().to(tensor.dtype), alpha=1 - interpolation)


def final_hidden(
    model: nn.Module, inputs: dict[str, Tensor], params: dict[str, Tensor] | None = None
) -> Tensor:
    """(B, T, d) final-layer hidden states of ``model``, or of ``model`` with ``params`` swapped in
    (``torch.func.functional_call``: the live parameters are not touched). The LM head runs at one
    position only."""
    from forgetless.training.loss import supports_logits_mask

    kwargs: dict[str, Any] = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "output_hidden_states": True,
        "use_cache": False,
    }
    if supports_logits_mask(model):
        kwargs["logits_to_keep"] = 1
    if params is None:
        return model(**kwargs).hidden_states[-1]
    return torch.func.functional_call(model, params, (), kwargs).hidden_states[-1]


def hidden_consistency(model: nn.Module, slow: dict[str, Tensor], inputs: dict[str, Tensor]) -> Tensor:
    """Mean squared difference of the fast (``model``, with gradient) and slow (``slow`` swapped
    in, eval mode, no gradient) final hidden states at the real tokens of ``inputs``."""
    fast_states = final_hidden(model, inputs)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            slow_states = final_hidden(model, inputs, slow)
    finally:
        for module, training in modes:
            module.training = training
    real = inputs["attention_mask"].bool()
    return F.mse_loss(fast_states[real].float(), slow_states[real].float())


def replayed_rows(batch: TrainBatch, first_replayed: int) -> dict[str, Tensor] | None:
    """The rows of a (right-padded) micro-batch that hold replayed examples (index in the stage's
    examples >= ``first_replayed``), trimmed to their longest; None when there are none."""
    inputs = batch.inputs
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    rows = [row for row, index in enumerate(batch.indices) if index >= first_replayed]
    if not rows:
        return None
    longest = max(lengths[row] for row in rows)
    index = torch.tensor(rows, device=inputs["input_ids"].device)
    return {key: inputs[key][index, :longest] for key in ("input_ids", "attention_mask")}


@register_strategy("ilora")
class ILoRA(Strategy):
    """I-LoRA; params: interpolation, consistency_weight, fraction, and AdapterConfig fields."""

    setting_required = "fully_cooperative"
    Params = ILoRAParams
    accepts_adapter_fields = True

    def __init__(self, params: dict[str, Any] | None = None, source: str = "params") -> None:
        self._slow: dict[str, Tensor] = {}
        self._first_replayed = 0  # StageContext.examples from this index on are replayed
        super().__init__(params, source)

    def make_engine(self) -> Engine:
        return AdapterEngine("lora", self.adapter_fields, "continue", source=self.source)

    def stage_data(self, stage: int, tasks: Sequence[Task], seed: int) -> list[tuple[Task, list[Example]]]:
        mixture = replay_mixture([task.train for task in tasks], stage, self.params.fraction, seed)
        return [(tasks[index], examples) for index, examples in mixture]

    def data_tasks(self, stage: int) -> list[int]:
        return list(range(stage + 1))

    # ---- hooks -----------------------------------------------------------------------------------

    def before_training(self, context: StageContext) -> None:
        """Slow learner = the adapter as built (fresh, or stage t-1's slow); fast learner = stage
        t-1's fast weights from its state; which rows are replayed."""
        params = trainable_named(context.model)
        self._slow = snapshot(params)
        if context.stage > 0:
            fast = _load_fast(context, params)
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(fast[name])
        # replay_mixture puts the current task first and whole; the replayed examples follow
        self._first_replayed = len(context.tasks[context.stage].train)

    def _on_device(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = trainable_named(model)
        device = next(iter(params.values())).device
        if next(iter(self._slow.values())).device != device:  # the loop moved the model
            self._slow = {name: tensor.to(device) for name, tensor in self._slow.items()}
        return params

    def after_step(self, model: nn.Module, step: int) -> None:
        """The slow learner follows the fast one after every optimizer step (the EMA)."""
        interpolate(self._slow, self._on_device(model), self.params.interpolation)

    def extra_loss(self, model: nn.Module, batch: TrainBatch | None = None) -> Tensor | None:
        """``gamma * MSE`` of fast and slow final hidden states on the batch's replayed rows."""
        if batch is None or self.params.consistency_weight == 0:
            return None
        rows = replayed_rows(batch, self._first_replayed)
        if rows is None:
            return None
        self._on_device(model)
        return self.params.consistency_weight * hidden_consistency(model, self._slow, rows)

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        return self._slow

    def after_training(self, context: StageContext) -> None:
        """The fast learner to the state folder; the slow learner into the model, which the runner
        saves as the stage's artifact."""
        params = self._on_device(context.model)
        fast = {FAST + name: param for name, param in params.items()}
        context.save_state(fast, {"interpolation": self.params.interpolation, "stage": context.stage})
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self._slow[name])


def _load_fast(context: StageContext, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Stage t-1's fast learner; an ``InputError`` when it does not fit this stage's adapter."""
    tensors, _ = context.load_state(context.stage - 1)
    fast = {name[len(FAST) :]: tensor for name, tensor in tensors.items() if name.startswith(FAST)}
    if fast.keys() != params.keys() or any(fast[n].shape != p.shape for n, p in params.items()):
        folder = context.previous[context.stage - 1] / STATE_DIR
        raise InputError(
            f"{folder} holds no I-LoRA fast learner for this adapter: stage {context.stage - 1} was "
            "trained by another strategy or with other settings; delete the run's stage folders "
            "from that stage on and train them again"
        )
    return fast
