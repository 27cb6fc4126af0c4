"""Learning without Forgetting (Li & Hoiem 2016, "Learning without Forgetting", ECCV / TPAMI 2017).

While stage t learns its task, the model's next-token distribution on the *new* data is distilled
towards the model as it was when the stage started (the teacher), so no old data is needed. At
every position p of a micro-batch whose next token is labelled (``batch.keep``, the answer
positions the cross-entropy already uses), with student logits s_p and teacher logits z_p::

    loss = lambda * T^2 * mean_p KL( softmax(z_p / T) || softmax(s_p / T) )

T is the distillation temperature; the T^2 factor (Hinton et al. 2015) keeps the gradient's scale
independent of T. The term is computed in float32 from the logits the answer loss already has in
the graph (``TrainBatch.logits``): the student runs no second forward. The loop divides it by
``grad_accum``, so each micro-batch's mean weighs the same.

The teacher at stage t is a frozen, eval-mode copy of the model as ``build`` returns it:

- stage 0: the base model. This keeps the base model's general behaviour without any old data,
  the question this project asks, so LwF applies from the first stage (the paper's "old task" is
  the pretrained model's own behaviour);
- stage t > 0: the model after stage t-1. With ``mode: lora`` the earlier adapters are merged into
  the base weights and a fresh LoRA sits on top; its B is zero, so the copy computes exactly the
  stage's starting model. With ``mode: fft`` it is the previous stage's full model.

At the start of a stage student and teacher agree, so the term and its gradient are zero; it pulls
back only once the student has moved. A resumed stage rebuilds the same teacher: ``before_training``
runs before the checkpoint is read, on the model as built.

Cost: one extra no-grad forward of the teacher per micro-batch (LM head at the answer positions
only) and one copy of the model in memory for the stage (with ``mode: lora`` a copy of the whole
merged model, not only of the adapter). The teacher runs in the model's own dtype, outside the
student's mixed-precision autocast.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from forgetless.strategies import ModeParams, Strategy, register_strategy
from forgetless.strategies._base import mode_engine
from forgetless.strategies._engines import Engine
from forgetless.strategies.context import StageContext, TrainBatch
from forgetless.training.loss import labelled_logits


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_rows KL(softmax(teacher / T) || softmax(student / T))`` in float32.

    Args:
        student: (N, V) logits that receive the gradient.
        teacher: (N, V) target logits (no gradient is taken through them).
        temperature: T > 0.

    Returns:
        A scalar; 0 when N is 0 (a micro-batch without answer tokens).
    """
    if student.shape[0] == 0:
        return student.float().sum() * 0.0  # keeps the graph, adds nothing
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    per_row = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
    return per_row.mean() * temperature**2


class LwFParams(ModeParams):
    weight: float = Field(1.0, ge=0, alias="lambda", description="lambda: weight of the distillation term")
    temperature: float = Field(2.0, gt=0, description="T: softmax temperature of teacher and student")


@register_strategy("lwf")
class LwF(Strategy):
    """LwF; params: lambda, temperature, mode (lora | fft), and AdapterConfig fields for mode lora."""

    Params = LwFParams
    accepts_adapter_fields = True

    def __init__(self, params: dict | None = None, source: str = "params") -> None:
        self.teacher: nn.Module | None = None
        super().__init__(params, source)

    def make_engine(self) -> Engine:
        return mode_engine(self, lora="merge", fft="continue")

    def before_training(self, context: StageContext) -> None:
        """The teacher: a frozen eval-mode copy of the model as built (see the module docstring)."""
        self.teacher = None
        if self.params.weight == 0:
            return
        teacher = copy.deepcopy(context.model)
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()

    def extra_loss(self, model: nn.Module, batch: TrainBatch | None = None) -> Tensor | None:
        """``lambda * distillation_loss(batch.logits, teacher logits, T)``; None with lambda 0."""
        if self.params.weight == 0 or batch is None:
            return None
        if self.teacher is None:
            raise RuntimeError("lwf: extra_loss before before_training built the teacher")
        if batch.logits.shape[0] == 0:  # no answer token here (a process's no-loss stand-in)
            return distillation_loss(batch.logits, batch.logits, self.params.temperature)
        device = batch.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)  # the loop moved the student after before_training
        with torch.no_grad():
            target = labelled_logits(
                self.teacher, batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.keep
            )
        return self.params.weight * distillation_loss(batch.logits, target, self.params.temperature)

    def after_training(self, context: StageContext) -> None:
        self.teacher = None  # free the copy before the next stage builds its model
