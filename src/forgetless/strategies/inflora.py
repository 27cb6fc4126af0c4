"""InfLoRA (Liang & Li, CVPR 2024, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning").

Each stage adds one LoRA branch ``s * B A`` (A: r x d_in, the down-projection) per target module.
A is *designed* before the stage trains and then frozen; only B trains. The update ``B A`` then
only moves the layer's output along inputs that ``A`` sees, and A is built to see (almost)
nothing of the earlier tasks' inputs, so the new task does not interfere with the old ones.

Design of A (``before_training``): one no-grad pass of the stage's training prompts + answers
(eval mode, real tokens only) through the stage's starting model gives, per target module, the
input covariance ``C = X^T X / N``. With M (d_in x k, orthonormal columns) the basis of the earlier
tasks' inputs and Q an orthonormal basis of its complement, A's rows are the top-r eigenvectors
of ``Q^T C Q`` mapped back by Q: the top eigenvectors of ``(I - M M^T) C (I - M M^T)``, the
paper's projected new-task input space, computed in the complement so that every row is exactly
orthogonal to M even where the projected spectrum is zero. Rows are scaled to norm ``1/sqrt(3)``
as the authors' code does; that is also the expected row norm of the Kaiming-uniform A of a fresh
LoRA (entries U(-1/sqrt(d_in), 1/sqrt(d_in))), so the usual LoRA learning rates carry over. When
fewer than r directions remain outside M, the remaining rows are zero (that rank stays unused).

Basis update (``after_training``, the DualGPM / GPM rule): the stage's inputs are collected again
through the trained model; with ``E`` the total energy ``trace(C)`` and the residual spectrum
``lambda_1 >= lambda_2 ...`` of C outside M, the k residual eigenvectors with the smallest k such
that ``(E - sum residual) / E + sum_{i<=k} lambda_i / E >= threshold`` are appended to M (none when
the old basis already explains ``threshold`` of the energy). Energy is the eigenvalues of C, i.e.
the squared singular values of the input matrix, as in GPM's criterion. We keep M itself (DualGPM
keeps its complement once M passes d_in/2, a memory saving that gives the same projection).

``threshold`` defaults to 0.95, the authors' setting for CIFAR-100 and DomainNet (``lamb`` in their
configs; 0.98 for ImageNet-R). Their code raises it linearly to 1.0 over the task sequence; we
keep it constant, because the length of the sequence is not part of a stage's fingerprint (a
stage reused in a longer sequence would otherwise hold a basis built with another threshold).

Earlier branches are folded into the base weights (``merge`` continuation): ``W + s B_i A_i`` is
exactly the frozen branch. The saved adapter holds the designed A and the trained B, so a
reloaded stage gives the same model.

State (``stage-i-task/state/``): ``basis.<module name>`` (d_in x k_i, float32), the accumulated
basis after stage i (stage i+1 reads only stage i's), and ``{threshold, dims}``.

Cost: per stage two no-grad passes over the stage data (``examples`` of them, default all), one
before and one after training, and per target module a few d_in x d_in eigendecompositions / QR
factorisations (float64, on CPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from forgetless.strategies import Strategy, StrategyParams, register_strategy
from forgetless.strategies._engines import AdapterEngine, Engine
from forgetless.strategies.context import StageContext

BASIS = "basis."
ROW_NORM = 1.0 / math.sqrt(3.0)
_BATCH = 8


def complement(basis: Tensor | None, dim: int) -> Tensor:
    """An orthonormal basis (dim x (dim - k)) of the orthogonal complement of span(``basis``)."""
    if basis is None or basis.shape[1] == 0:
        return torch.eye(dim, dtype=torch.float64)
    q, _ = torch.linalg.qr(basis.to(torch.float64), mode="complete")
    return q[:, basis.shape[1] :]


def _residual_spectrum(covariance: Tensor, basis: Tensor | None) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, >= 0) and eigenvectors (d x m, columns) of C outside span(basis)."""
    q = complement(basis, covariance.shape[0])
    values, vectors = torch.linalg.eigh(q.T @ covariance.to(torch.float64) @ q)
    order = torch.argsort(values, descending=True)
    return values[order].clamp_min(0), q @ vectors[:, order]


def design_down_projection(covariance: Tensor, basis: Tensor | None, rank: int) -> Tensor:
    """A (rank x d): the top-``rank`` eigenvectors of C projected away from ``basis``, rows of norm
    ``ROW_NORM``, orthogonal to ``basis``; zero rows when fewer directions remain."""
    dim = covariance.shape[0]
    _, vectors = _residual_spectrum(covariance, basis)
    rows = torch.zeros(rank, dim, dtype=torch.float64)
    kept = min(rank, vectors.shape[1])
    rows[:kept] = vectors[:, :kept].T
    return rows * ROW_NORM


def grow_basis(basis: Tensor | None, covariance: Tensor, threshold: float) -> Tensor:
    """``basis`` (d x k) with the residual directions of C appended until ``threshold`` of C's
    energy lies in its span (GPM / DualGPM criterion); float64, orthonormal columns."""
    dim = covariance.shape[0]
    old = torch.zeros(dim, 0, dtype=torch.float64) if basis is None else basis.to(torch.float64)
    total = float(torch.trace(covariance.to(torch.float64)))
    if total <= 0:
        return old
    values, vectors = _residual_spectrum(covariance, old)
    explained = (total - float(values.sum())) / total  # energy already inside span(old)
    if explained >= threshold:
        return old
    reached = explained + torch.cumsum(values, 0) / total
    count = min(int((reached < threshold).sum()) + 1, vectors.shape[1])
    return torch.cat([old, vectors[:, :count]], dim=1)


@torch.no_grad()
def input_covariances(context: StageContext, limit: int | None = None) -> dict[str, Tensor]:
    """Module name -> (d_in x d_in) mean of ``x x^T`` over the real tokens of the stage's examples
    (prompt and answer), for every LoRA layer's input; eval mode, float64 on CPU."""
    from forgetless.adapters import lora_factors
    from forgetless.training.loss import supports_logits_mask

    model = context.model
    layers = {name: model.get_submodule(name) for name in lora_factors(model)}
    sums: dict[str, Tensor] = {}
    current: dict[str, Tensor] = {}

    def hook(name: str):  # noqa: ANN202
        def collect(module: nn.Module, args: tuple) -> None:
            x, mask = args[0].detach(), current["mask"]
            rows = x[mask] if x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            rows = rows.float()
            sums[name] = sums.get(name, 0) + rows.T @ rows

        return collect

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    was_training, tokens = model.training, 0
    extra: dict[str, Any] = {"logits_to_keep": 1} if supports_logits_mask(model) else {}
    model.eval()
    try:
        for batch in context.batches(_BATCH, limit):
            current["mask"] = batch["attention_mask"].bool()
            tokens += int(current["mask"].sum())
            model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **extra
            )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (total / max(tokens, 1)).double().cpu() for name, total in sums.items()}


class InfLoRAParams(StrategyParams):
    threshold: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="energy of each task's inputs the earlier-task basis must explain (authors' configs: 0.95)",
    )
    examples: int | None = Field(
        None, ge=1, description="training examples used to estimate the input subspaces (default all)"
    )


@register_strategy("inflora")
class InfLoRA(Strategy):
    """InfLoRA; params: ``threshold``, ``examples`` and AdapterConfig fields (r, alpha, target_modules ...)."""

    Params = InfLoRAParams
    accepts_adapter_fields = True

    def __init__(self, params: dict[str, Any] | None = None, source: str = "params") -> None:
        self._basis: dict[str, Tensor] = {}  # the earlier tasks' basis during a stage
        self._carried: dict[str, Tensor] = {}  # after a stage, for a next stage without folders
        super().__init__(params, source)

    def make_engine(self) -> Engine:
        return AdapterEngine("lora", self.adapter_fields, "merge", source=self.source)

    def _earlier_basis(self, context: StageContext) -> dict[str, Tensor]:
        """The basis saved by stage ``stage - 1`` (it holds every earlier task's directions)."""
        if context.stage == 0:
            return {}
        if not context.previous:  # trained without stage folders: what the last stage left here
            return dict(self._carried)
        tensors, _ = context.load_state(context.stage - 1)
        return {
            key.removeprefix(BASIS): value.double().cpu()
            for key, value in tensors.items()
            if key.startswith(BASIS)
        }

    def before_training(self, context: StageContext) -> None:
        """Design every LoRA layer's A from the stage's inputs outside the earlier basis; freeze it."""
        from forgetless.adapters import lora_factors

        self._basis = self._earlier_basis(context)
        covariances = input_covariances(context, self.params.examples)
        for name, (a, _, _) in lora_factors(context.model).items():
            design = design_down_projection(covariances[name], self._basis.get(name), a.shape[0])
            with torch.no_grad():
                a.copy_(design.to(device=a.device, dtype=a.dtype))
            a.requires_grad_(False)

    def after_training(self, context: StageContext) -> None:
        """Grow each module's basis with this task's inputs and save it as the stage's state."""
        covariances = input_covariances(context, self.params.examples)
        threshold = self.params.threshold
        grown = {
            name: grow_basis(self._basis.get(name), covariance, threshold)
            for name, covariance in covariances.items()
        }
        self._carried = grown
        context.save_state(
            {BASIS + name: basis.float() for name, basis in grown.items()},
            {
                "threshold": threshold,
                "stage": context.stage,
                "dims": {n: b.shape[1] for n, b in grown.items()},
            },
        )
