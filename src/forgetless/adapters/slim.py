"""SLIM: a mixture of LoRA and identity experts with weight yielding and dynamic merging.

One layer wraps a frozen ``y = W x + b`` (DESIGN.md, "SLIM, as we implement it"); it reads in the
order of the method:

1. router logits ``g = W_g x``                                        (``router_logits``)
2. sliding clustering of the training inputs                          (``SlidingClusters``)
3. distance ``d(x)`` of a token to its nearest centre, calibrated     (``SlidingClusters``)
4. weight yielding ``g_id += gamma d(x)``, top-K, softmax over the K  (``route``)
5. ``y = W x + b + sum_{e in top-K, LoRA} w_e s B'_e A'_e x``          (``forward``)
6. dynamic merging: structured DARE masks ``A', B'``, rescale, lambda  (``expert_factors``)
7. L1 penalty on A and B                                              (``l1_penalty``)
8. load-balancing loss over LoRA experts (MixLoRA)                    (``balance_loss``)

The same class is the MixLoRA-style ``moe_lora`` baseline (no identity experts, no yielding, no
masking): the kinds differ only in their config defaults. All experts are computed at once as one
rank ``E_l r`` product (stacked A and B), weighted per token; no loop over tokens or experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from forgetless.adapters.base import ADAPTER_LAYERS, AdapterLayer, TokenContext
from forgetless.adapters.clustering import SlidingClusters
from forgetless.adapters.config import AdapterConfig
from forgetless.adapters.masking import masked_experts, structured_dare_masks


class MixtureLinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus ``E_l`` routed LoRA experts and ``E_id`` identity experts.

    Parameters:
        lora_A: (E_l, r, d_in); lora_B: (E_l, d_out, r); router: (E_l + E_id, d_in).
    Buffers:
        expert_scaling: (E_l,) the ``s = alpha / r`` of each expert (experts built from different
        adapters may differ); ``clusters.*``: the sliding-clustering state (SLIM only).
    """

    kind = "mixture"

    def __init__(
        self,
        base_layer: nn.Linear,
        config: AdapterConfig,
        context: TokenContext,
        generator: torch.Generator,
        layer_index: int = 0,
    ) -> None:
        super().__init__(base_layer, config, context)
        self.kind = config.kind
        dtype, device = self.adapter_dtype(), base_layer.weight.device
        experts, rank = config.num_experts, config.r
        # every expert starts like a fresh PEFT LoRA: A Kaiming-uniform, B zero (no change at step 0)
        bound = 1.0 / math.sqrt(self.in_features)
        lora_a = torch.empty(experts, rank, self.in_features, dtype=dtype).uniform_(
            -bound, bound, generator=generator
        )
        self.lora_A = nn.Parameter(lora_a.to(device), requires_grad=config.train_experts)
        self.lora_B = nn.Parameter(
            torch.zeros(experts, self.out_features, rank, dtype=dtype, device=device),
            requires_grad=config.train_experts,
        )
        self.register_buffer(
            "expert_scaling", torch.full((experts,), config.scaling, dtype=dtype, device=device)
        )
        router = torch.randn(config.num_total_experts, self.in_features, generator=generator, dtype=dtype)
        self.router = nn.Parameter((router * config.router_init_std).to(device))
        self.clusters = (
            SlidingClusters(
                config.num_clusters,
                self.in_features,
                momentum=config.cluster_momentum,
                reduction=config.distance_reduction,
                quantile=config.distance_quantile,
                calibration=config.distance_calibration,
                seed=config.seed * 1_000_003 + layer_index,
            ).to(device)
            if config.uses_clustering
            else None
        )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.mask_seed = config.seed * 1_000_003 + layer_index
        self._training_masks = torch.Generator().manual_seed(
            self.mask_seed
        )  # fresh masks every training step
        self._eval_masks: tuple[Tensor, Tensor, float] | None = None
        self._eval_factors: tuple[tuple, tuple[Tensor, Tensor, float]] | None = None
        self._balance: Tensor | None = None
        # set by routing_diagnostics: called with this layer's routing of every forward
        self.recorder: Callable[..., None] | None = None

    # ---- 1. router logits -----------------------------------------------------------------------

    def router_logits(self, x: Tensor) -> Tensor:
        """``g = W_g x`` (optionally on the RMS-normalised token). x: (T, d_in) -> (T, E_l + E_id)."""
        if self.config.router_input_norm:
            x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-6)
        return x @ self.router.T

    # ---- 2-4. clustering, distance, weight yielding, top-K --------------------------------------

    def route(self, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Routing weights of every expert for every token.

        Returns:
            weights (T, E_l + E_id): softmax over each token's top-K corrected logits, 0 elsewhere;
            logits (T, E_l + E_id) before top-K; chosen (T, K) expert indices; distance (T,) the
            calibrated ``d(x)`` (None without clustering).
        """
        logits = self.router_logits(x)
        distance = None
        if self.clusters is not None:
            distance, _ = self.clusters(x.detach(), token_mask, learn=self.training)
            # Eq. 4: identity experts' logits grow with the distance from the fine-tuning data,
            # so tokens that look out of distribution yield to the base layer.
            shift = self.config.yield_scale * distance.to(logits.dtype)
            num_lora = self.config.num_experts
            logits = torch.cat([logits[:, :num_lora], logits[:, num_lora:] + shift[:, None]], dim=1)
        top_logits, chosen = logits.topk(self.config.top_k, dim=1)
        weights = torch.zeros_like(logits).scatter(1, chosen, torch.softmax(top_logits, dim=1))
        return weights, logits, chosen, distance

    # ---- 6. dynamic merging ---------------------------------------------------------------------

    def _merging_active(self) -> bool:
        config = self.config
        wanted = config.mask_ratio > 0 or config.merge_scale != 1.0
        return wanted and (not self.training or config.mask_in_training)

    def _masks(self) -> tuple[Tensor, Tensor, float]:
        """Structured DARE masks: fixed per layer (seeded) at inference, fresh each training step."""
        shape = (self.config.num_experts, self.in_features, self.out_features, self.config.mask_ratio)
        if self.training:
            return structured_dare_masks(*shape, generator=self._training_masks)
        if self._eval_masks is None:
            self._eval_masks = structured_dare_masks(
                *shape, generator=torch.Generator().manual_seed(self.mask_seed)
            )
        return self._eval_masks

    def expert_factors(self) -> tuple[Tensor, Tensor, float]:
        """Stacked expert factors as used this forward.

        Returns:
            a (E_l r, d_in), b (E_l r, d_out) and the factor ``lambda / f`` (1 without merging):
            the update of expert e is ``factor * b_e^T a_e`` with the masks of step 6 applied.
        """
        lora_a, lora_b, factor = self.lora_A, self.lora_B, 1.0
        if self._merging_active():
            input_mask, output_mask, rescale = self._masks()
            lora_a, lora_b = masked_experts(lora_a, lora_b, input_mask, output_mask)
            factor = self.config.merge_scale * rescale
        experts, rank = self.config.num_experts, self.config.r
        a = lora_a.reshape(experts * rank, self.in_features)
        b = lora_b.transpose(1, 2).reshape(experts * rank, self.out_features)
        return a, b, factor

    def _cached_expert_factors(self) -> tuple[Tensor, Tensor, float]:
        """At inference without autograd the masked factors are built once, not every token."""
        if self.training or torch.is_grad_enabled():
            return self.expert_factors()
        key = (self.lora_A._version, self.lora_B._version, self.lora_A.data_ptr(), self.lora_B.data_ptr())
        if self._eval_factors is None or self._eval_factors[0] != key:
            self._eval_factors = (key, self.expert_factors())
        return self._eval_factors[1]

    def train(self, mode: bool = True) -> MixtureLinear:
        self._eval_factors = None
        return super().train(mode)

    def after_load(self) -> None:
        self._eval_factors = None

    def __getstate__(self) -> dict:
        # copies and pickles leave out per-forward values (the balance loss is part of a graph)
        state = super().__getstate__()
        state = dict(state, _balance=None, _eval_factors=None, recorder=None)
        return state

    # ---- 5. output --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        result = self.base_layer(x)
        leading = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        token_mask = self.context.token_mask(leading)
        weights, logits, chosen, distance = self.route(tokens, token_mask)
        num_lora, rank = self.config.num_experts, self.config.r
        a, b, factor = self._cached_expert_factors()
        # identity experts add nothing: their weight only takes share away from the LoRA experts
        lora_weights = weights[:, :num_lora] * (self.expert_scaling * factor)
        hidden = self.dropout(tokens) @ a.T  # (T, E_l r): every expert's A x in one product
        hidden = (hidden.view(-1, num_lora, rank) * lora_weights[:, :, None]).view(-1, num_lora * rank)
        update = hidden @ b  # (T, d_out): the weighted sum of the experts' B (A x)
        if self.training and self.config.balance_weight > 0:
            self._balance = self._load_balance(logits, chosen, token_mask)
        if self.recorder is not None:
            self.recorder(self, weights.detach(), chosen, distance, token_mask)
        return result + update.view(*leading, self.out_features).to(result.dtype)

    # ---- 7-8. regularisers ----------------------------------------------------------------------

    def l1_penalty(self) -> Tensor:
        rank = self.config.r
        return self.lora_B.abs().sum() / (rank * self.out_features) + self.lora_A.abs().sum() / (
            rank * self.in_features
        )

    def _load_balance(self, logits: Tensor, chosen: Tensor, token_mask: Tensor | None) -> Tensor:
        """``E_l sum_e f_e P_e`` over LoRA experts (Switch / MixLoRA): f_e = share of LoRA slots
        given to e, P_e = mean router probability of e; 1 when perfectly balanced."""
        num_lora = self.config.num_experts
        if token_mask is not None:
            logits, chosen = logits[token_mask], chosen[token_mask]
        probabilities = torch.softmax(logits[:, :num_lora].float(), dim=1).mean(dim=0)
        lora_slots = chosen[chosen < num_lora]
        counts = torch.bincount(lora_slots, minlength=num_lora).float()
        share = counts / counts.sum().clamp_min(1.0)
        return num_lora * (share * probabilities).sum()

    def balance_loss(self) -> Tensor | None:
        return self._balance


ADAPTER_LAYERS.register("moe_lora", MixtureLinear)
ADAPTER_LAYERS.register("slim", MixtureLinear)
