"""EWC (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018, "Progress & Compress").

One set of trainable weights continues across stages (``mode: lora``: one LoRA adapter kept
from stage to stage; ``mode: fft``: every weight), and stage t > 0 adds to the answer loss a
quadratic pull towards the weights at the end of stage t-1, stronger where the earlier tasks
were more sensitive::

    L_t(theta) = CE_t(theta) + lambda / 2 * sum_i F_i (theta_i - theta*_i)^2

with ``theta*`` the trainable weights at the end of stage t-1 (the *anchor*) and ``F`` the
diagonal empirical Fisher information, accumulated over stages the online way::

    F^(t) = gamma * F^(t-1) + F_t,   F_t,i = 1/N sum_n (d loss_n / d theta_i)^2

``loss_n`` is the mean answer-token cross-entropy of training example n, one example at a time
(the square of a batch gradient is not the Fisher), over the first ``fisher_examples`` examples
of the stage, in eval mode at the stage's final weights. ``gamma = 1`` sums the Fishers of every
task with one anchor (Huszar 2018's correction of the multi-penalty form); ``gamma < 1`` forgets
old importances geometrically, as online EWC does.

State (``stage-i-task/state/``): ``fisher.<name>`` (float32) and ``anchor.<name>`` (the weights'
dtype) for every trainable parameter, and ``{gamma, examples, stage}``. In ``mode: fft`` this is
two more copies of every weight, held in memory during training and written to disk per stage.

Cost: after each stage one forward and backward per Fisher example (``fisher_examples``); each
training step one elementwise term per trainable weight (its backward saves no activations).

``lambda`` defaults to 2e4: EasyCL (ECNU-ICALK/EasyCL, EWC for LLMs on LoRA) uses
``ewc_lambda = 10000`` with ``lambda * sum F (theta - theta*)^2`` (no 1/2) and a Fisher of the
same per-example mean token loss; the same strength here is 2e4. The scale fits: the squared
gradient norm of a mean token loss is O(1), spread over millions of weights, so F_i ~ 1e-6 and a
drift of 1e-2 per weight costs a penalty of order the cross-entropy itself.

In ``mode: lora`` the anchored weights are the adapter's A and B factors (the Fisher is taken
with respect to them, not the merged update B A). Under AdamW every weight still moves by about
the learning rate per step however large its penalty gradient: lambda bounds the Fisher-weighted
distance ``sum F (theta - theta*)^2``, not each weight's drift below ~lr.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from forgetless.data.formatting import IGNORE_INDEX
from forgetless.errors import InputError
from forgetless.strategies import ModeParams, Strategy, register_strategy
from forgetless.strategies._base import mode_engine
from forgetless.strategies._engines import Engine
from forgetless.strategies.context import STATE_DIR, StageContext, TrainBatch, snapshot, trainable_named

FISHER, ANCHOR = "fisher.", "anchor."


class _Quadratic(torch.autograd.Function):
    """``sum F (theta - anchor)^2`` whose backward recomputes the difference: autograd would keep
    two temporaries per weight until the backward (two model copies in ``mode: fft``)."""

    @staticmethod
    def forward(ctx: Any, param: Tensor, anchor: Tensor, fisher: Tensor) -> Tensor:
        ctx.save_for_backward(param, anchor, fisher)
        diff = param.detach().float() - anchor.float()
        return (fisher * diff * diff).sum()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        param, anchor, fisher = ctx.saved_tensors
        diff = param.detach().float() - anchor.float()
        return (2 * grad_output * fisher * diff).to(param.dtype), None, None


def ewc_penalty(params: dict[str, Tensor], anchor: dict[str, Tensor], fisher: dict[str, Tensor]) -> Tensor:
    """``sum_i F_i (theta_i - theta*_i)^2`` over ``params`` (float32 scalar, differentiable)."""
    terms = [_Quadratic.apply(param, anchor[name], fisher[name]) for name, param in params.items()]
    return torch.stack(terms).sum()


def empirical_fisher(context: StageContext, limit: int) -> tuple[dict[str, Tensor], int]:
    """Mean squared per-example gradient of the answer loss for every trainable parameter.

    Runs in eval mode (every module's mode restored afterwards) through ``torch.autograd.grad``,
    so no ``.grad`` is touched. Examples without an answer token are skipped.

    Returns:
        name -> float32 Fisher diagonal on the model's device, and the number of examples used.
    """
    from forgetless.training.loss import answer_loss

    model = context.model
    named = trainable_named(model)
    names, params = list(named), list(named.values())
    fisher = {name: torch.zeros_like(param, dtype=torch.float32) for name, param in named.items()}
    modes, used = [(module, module.training) for module in model.modules()], 0
    model.eval()
    try:
        with torch.enable_grad():
            for batch in context.batches(1, limit=limit):
                if not (batch["labels"][:, 1:] != IGNORE_INDEX).any():
                    continue
                loss = answer_loss(model, batch, share_prefix=False)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        fisher[name] += grad.detach().float().pow(2)
                used += 1
    finally:
        for module, training in modes:
            module.training = training
    for tensor in fisher.values():
        tensor /= max(used, 1)
    return fisher, used


class EWCParams(ModeParams):
    ewc_weight: float = Field(
        2e4, ge=0, alias="lambda", description="lambda: weight of the EWC penalty (EasyCL's 1e4 without 1/2)"
    )
    gamma: float = Field(
        1.0, gt=0, le=1, description="online EWC: decay of the earlier Fisher (1: sum over tasks)"
    )
    fisher_examples: int = Field(64, ge=1, description="training examples of a stage used for its Fisher")


@register_strategy("ewc")
class EWC(Strategy):
    """EWC / online EWC; params: lambda, gamma, fisher_examples, mode (lora | fft), adapter fields."""

    Params = EWCParams
    accepts_adapter_fields = True

    def __init__(self, params: dict[str, Any] | None = None, source: str = "params") -> None:
        self._fisher: dict[str, Tensor] = {}
        self._anchor: dict[str, Tensor] = {}
        super().__init__(params, source)

    def make_engine(self) -> Engine:
        return mode_engine(self, lora="continue", fft="continue")

    def before_training(self, context: StageContext) -> None:
        """Read stage t-1's Fisher and anchor (nothing at stage 0)."""
        self._fisher, self._anchor = {}, {}
        if context.stage == 0:
            return
        tensors, _ = context.load_state(context.stage - 1)
        fisher = {k[len(FISHER) :]: v for k, v in tensors.items() if k.startswith(FISHER)}
        anchor = {k[len(ANCHOR) :]: v for k, v in tensors.items() if k.startswith(ANCHOR)}
        _check_state(context, fisher, anchor)
        self._fisher, self._anchor = fisher, anchor

    def extra_loss(self, model: nn.Module, batch: TrainBatch | None = None) -> Tensor | None:
        """``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2``; None at stage 0 or with lambda 0."""
        if not self._fisher or self.params.ewc_weight == 0:
            return None
        params = trainable_named(model)
        device = next(iter(params.values())).device
        if next(iter(self._fisher.values())).device != device:  # the loop moved the model
            self._fisher = {name: t.to(device) for name, t in self._fisher.items()}
            self._anchor = {name: t.to(device) for name, t in self._anchor.items()}
        return self.params.ewc_weight / 2 * ewc_penalty(params, self._anchor, self._fisher)

    def after_training(self, context: StageContext) -> None:
        """Fisher of this stage, combined with the earlier one, and the anchor, to the state folder."""
        if not context.main:
            return  # only the main process writes state; the others would compute it for nothing
        fisher, used = empirical_fisher(context, self.params.fisher_examples)
        gamma = self.params.gamma
        for name, earlier in self._fisher.items():
            fisher[name] += gamma * earlier.to(fisher[name].device)
        anchor = snapshot(trainable_named(context.model))
        tensors = {FISHER + name: t for name, t in fisher.items()}
        tensors.update({ANCHOR + name: t for name, t in anchor.items()})
        context.save_state(tensors, {"gamma": gamma, "examples": used, "stage": context.stage})


def _check_state(context: StageContext, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
    """The saved state must cover exactly the model's trainable parameters, with their shapes."""
    named = trainable_named(context.model)
    folder = context.previous[context.stage - 1] / STATE_DIR
    problem = ""
    if fisher.keys() != named.keys() or anchor.keys() != named.keys():
        missing = sorted(named.keys() - fisher.keys()) or sorted(fisher.keys() - named.keys())
        problem = f"other parameters than this stage trains (e.g. '{missing[0]}')" if missing else ""
        problem = problem or "Fisher and anchor tensors for other parameters"
    else:
        for name, param in named.items():
            if fisher[name].shape != param.shape or anchor[name].shape != param.shape:
                problem = f"shape {tuple(fisher[name].shape)} for '{name}', which is {tuple(param.shape)}"
                break
    if problem:
        raise InputError(
            f"{folder} holds EWC state with {problem}: stage {context.stage - 1} was trained by another "
            "strategy or with other settings; delete the run's stage folders from that stage on and "
            "train them again"
        )
