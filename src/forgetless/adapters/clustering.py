"""Sliding clustering and the distance ``d(x)`` of SLIM's weight yielding (steps 2-3 of slim.py's docstring).

Each adapted layer keeps ``N_c`` centres ``mu_k`` with a per-channel variance ``sigma_k^2`` of the
inputs it saw while training (a diagonal Gaussian mixture of the fine-tuning distribution). In
train mode every token is assigned to its nearest centre (standardised Euclidean distance) and the
centre and variance move as an exponential moving average; in eval mode they are frozen.

The distance of a token to the training distribution is (paper, Sec. 3.3)

    d(x) = reduce_c |x_c - mu_{k*,c}| / sigma_{k*,c} - 1          (k* = nearest centre)

with ``reduce`` = max (paper), a quantile, or the mean over channels. Raw ``d`` grows with the
layer width, so before it shifts router logits it is calibrated per layer against running
in-domain statistics of ``r(x) = d(x) + 1`` (always positive):

    ratio:  (r - r_ref) / r_ref        zscore: (r - r_ref) / std_r        none: d  (the paper's)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Channels whose in-domain variance is ~0 would turn rounding noise into huge |z|; floor each
# centre's variance at this fraction of its mean channel variance (sigma floor ~10% of the rms sigma).
_VARIANCE_FLOOR = 1e-2


@dataclass(frozen=True)
class ClusterConstants:
    """Derived from the cluster state: inverse floored variances (N_c, d), their square roots,
    ``-2 mu / var`` (N_c, d), ``sum mu^2 / var`` (N_c,), and the calibration's affine map."""

    inverse: Tensor
    inverse_sigma: Tensor
    cross: Tensor
    offset: Tensor
    calibration_scale: float
    calibration_offset: float
    version: tuple  # the buffer versions these were derived from


class SlidingClusters(nn.Module):
    """Centres, variances and the distance reference of one layer (all buffers, all saved).

    Args:
        num_clusters: ``N_c``.
        dim: ``d_in``.
        momentum: EMA momentum ``m``: ``new = m * old + (1 - m) * batch``.
        reduction: ``max`` | ``quantile`` | ``mean`` over channels.
        quantile: the quantile used by ``reduction="quantile"``.
        calibration: ``ratio`` | ``zscore`` | ``none``.
        seed: picks the first batch's tokens that become the initial centres.
    """

    def __init__(
        self,
        num_clusters: int,
        dim: int,
        momentum: float,
        reduction: str,
        quantile: float,
        calibration: str,
        seed: int,
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.reduction = reduction
        self.quantile = quantile
        self.calibration = calibration
        self.seed = seed
        self.register_buffer("centres", torch.zeros(num_clusters, dim))
        self.register_buffer("variances", torch.ones(num_clusters, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # running mean and mean square of r(x) = d(x) + 1 over in-domain (training) tokens
        self.register_buffer("reference_mean", torch.ones(()))
        self.register_buffer("reference_square", torch.ones(()))
        self._constants: tuple[tuple, ClusterConstants] | None = None

    # ---- step 2: assignment and sliding update --------------------------------------------------

    def constants(self) -> ClusterConstants:
        """Tensors derived from the state, used by every distance computation.

        Rebuilt whenever the buffers changed (in-place updates bump their versions), so at
        inference they are computed once rather than for every token.
        """
        key = (
            self.centres._version,
            self.variances._version,
            self.reference_mean._version,
            self.reference_square._version,
            self.centres.data_ptr(),
        )
        if self._constants is None or self._constants[0] != key:
            self._constants = (key, self._build_constants(key))
        return self._constants[1]

    def _build_constants(self, version: tuple) -> ClusterConstants:
        floor = self.variances.mean(dim=1, keepdim=True) * _VARIANCE_FLOOR
        inverse = torch.maximum(self.variances, floor).clamp_min(1e-12).reciprocal()  # (N_c, d)
        # calibration as one affine map of r(x): calibrated = r * scale + offset
        reference = float(self.reference_mean.clamp_min(1e-6))
        if self.calibration == "none":
            scale, offset = 1.0, -1.0
        elif self.calibration == "ratio":
            scale, offset = 1.0 / reference, -1.0
        else:
            spread = float((self.reference_square - self.reference_mean**2).clamp_min(1e-12).sqrt())
            scale, offset = 1.0 / spread, -reference / spread
        return ClusterConstants(
            inverse=inverse,
            inverse_sigma=inverse.sqrt(),
            cross=-2 * self.centres * inverse,
            offset=(self.centres * self.centres * inverse).sum(dim=1),
            calibration_scale=scale,
            calibration_offset=offset,
            version=version,
        )

    def nearest(self, x: Tensor, cross_term: Tensor | None = None) -> Tensor:
        """Index of the nearest centre for each token. x: (T, d) -> (T,) long.

        ``sum_c (x_c - mu_kc)^2 / var_kc = (x^2) inv^T - 2 x (mu inv)^T + sum mu^2 inv``: matmuls,
        no (T, N_c, d) tensor. ``cross_term`` is ``x @ cross^T`` when the caller computed it
        already (fused with the router's matmul).
        """
        constants = self.constants()
        if cross_term is None:
            cross_term = x @ constants.cross.T
        scores = torch.addmm(constants.offset, x * x, constants.inverse.T) + cross_term
        return scores.argmin(dim=1)

    @torch.no_grad()
    def initialise(self, x: Tensor) -> None:
        """Centres = ``N_c`` seeded-random tokens of the first batch, variances = the batch's. x: (T, d)."""
        generator = torch.Generator().manual_seed(self.seed)
        count = self.centres.shape[0]
        picks = torch.randperm(x.shape[0], generator=generator)
        picks = picks.repeat(math.ceil(count / max(len(picks), 1)))[:count]
        self.centres.copy_(x[picks.to(x.device)])
        batch_variance = x.var(dim=0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(x[0])
        self.variances.copy_(batch_variance.expand_as(self.variances))
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, x: Tensor, assignment: Tensor) -> None:
        """Move every centre that received tokens towards their mean, and its variance likewise.

        x: (T, d) in-domain tokens; assignment: (T,) nearest-centre indices.
        """
        count = self.centres.shape[0]
        counts = torch.zeros(count, device=x.device, dtype=x.dtype).index_add_(
            0, assignment, torch.ones_like(assignment, dtype=x.dtype)
        )
        sums = torch.zeros_like(self.centres).index_add_(0, assignment, x)
        squares = torch.zeros_like(self.centres).index_add_(0, assignment, x * x)
        seen = counts > 0
        safe = counts.clamp_min(1)[:, None]
        batch_mean, batch_square = sums / safe, squares / safe
        m = self.momentum
        new_centres = m * self.centres + (1 - m) * batch_mean
        # variance around the new centre: E[x^2] - 2 mu E[x] + mu^2
        batch_variance = (batch_square - 2 * new_centres * batch_mean + new_centres**2).clamp_min(0)
        new_variances = m * self.variances + (1 - m) * batch_variance
        self.centres.copy_(torch.where(seen[:, None], new_centres, self.centres))
        self.variances.copy_(torch.where(seen[:, None], new_variances, self.variances))

    # ---- step 3: distance and its calibration ---------------------------------------------------

    def raw_distance(self, x: Tensor, assignment: Tensor) -> Tensor:
        """``r(x) = reduce_c |x_c - mu_{k*,c}| / sigma_{k*,c}`` (= d(x) + 1). x: (T, d) -> (T,)."""
        z = ((x - self.centres[assignment]) * self.constants().inverse_sigma[assignment]).abs()
        if self.reduction == "max":
            return z.amax(dim=1)
        if self.reduction == "mean":
            return z.mean(dim=1)
        # the q-quantile as the k-th smallest value, k = ceil(q d): a partial sort, not a full one
        k = min(max(math.ceil(self.quantile * z.shape[1]), 1), z.shape[1])
        return z.kthvalue(k, dim=1).values

    @torch.no_grad()
    def update_reference(self, raw: Tensor, first: bool) -> None:
        """EMA of the in-domain mean and mean square of ``r(x)``; raw: (T,) in-domain tokens."""
        mean, square = raw.mean(), (raw * raw).mean()
        if first:
            self.reference_mean.copy_(mean)
            self.reference_square.copy_(square)
        else:
            m = self.momentum
            self.reference_mean.mul_(m).add_((1 - m) * mean)
            self.reference_square.mul_(m).add_((1 - m) * square)

    def calibrate(self, raw: Tensor) -> Tensor:
        """The signal that shifts identity logits: (T,) raw distances -> (T,) calibrated."""
        constants = self.constants()
        return raw * constants.calibration_scale + constants.calibration_offset

    @torch.no_grad()
    def forward(
        self, x: Tensor, token_mask: Tensor | None, learn: bool, cross_term: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Distance of every token, learning the clusters first when ``learn`` (train mode).

        Args:
            x: (T, d) tokens (detached; computed in the buffers' dtype).
            token_mask: (T,) bool, False for padding (excluded from learning), or None.
            learn: update centres, variances and the reference (train mode only).
            cross_term: ``x @ constants().cross.T`` if already computed (ignored when learning
                initialises the centres, which changes it).

        Returns:
            (calibrated (T,), raw r(x) (T,)): the calibrated signal uses the state before this
            batch's update, so a token is never judged against statistics it just moved.
        """
        x = x.to(self.centres.dtype)
        learning_tokens = x if token_mask is None else x[token_mask]
        first = learn and not bool(self.initialised) and learning_tokens.shape[0] > 0
        if first:
            self.initialise(learning_tokens)
            cross_term = None
        assignment = self.nearest(x, cross_term)
        raw = self.raw_distance(x, assignment)
        if not (learn and learning_tokens.shape[0] > 0):
            return self.calibrate(raw), raw
        in_domain_raw = raw if token_mask is None else raw[token_mask]
        if first:  # no reference yet: the first batch is its own reference
            self.update_reference(in_domain_raw, first=True)
        calibrated = self.calibrate(raw)
        if not first:
            self.update_reference(in_domain_raw, first=False)
        self.update(learning_tokens, assignment if token_mask is None else assignment[token_mask])
        return calibrated, raw
