"""SLIM: a mixture of LoRA and identity experts with weight yielding and dynamic merging.

One layer wraps a frozen ``y = W x + b`` (the SLIM paper, Sec. 3, as we implement it); it reads in the
order of the method:

1. router logits ``g = W_g x``                                        (``router_logits``)
2. sliding clustering of the training inputs                          (``SlidingClusters``)
3. distance ``d(x)`` of a token to its nearest centre, calibrated     (``SlidingClusters``)
4. weight yielding ``g_id += gamma d(x)``, top-K, softmax over the K  (``route``)
5. ``y = W x + b + sum_{e in top-K, LoRA} w_e s B'_e A'_e x``          (``forward``)
6. dynamic merging: structured DARE masks ``A', B'``, rescale, lambda  (``expert_factors``)
7. L1 penalty on A and B                                              (``l1_penalty``)
8. load-balancing loss over LoRA experts (MixLoRA), or LoRAMoE's      (``balance_loss``)
   localized balancing constraint                                     (regularisers.py)

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
from forgetless.adapters.experts import dense_update, sparse_update
from forgetless.adapters.gate import GateStatistics, RunningMoments
from forgetless.adapters.inference import InferencePlan, build_plan, inference_update
from forgetless.adapters.masking import masked_experts, structured_dare_masks
from forgetless.adapters.pooling import PromptPool
from forgetless.adapters.regularisers import l1_penalty, load_balance, localized_balance
from forgetless.adapters.selection import select_experts
from forgetless.adapters.sequence_routing import SequenceRouting
from forgetless.adapters.stages import StageExperts

# Below this many tokens (generation) the folded inference plan runs (inference.py); on an
# accelerator it is also where experts start to run only on their routed tokens (K / E_l of the
# dense work), while one dense product over all experts costs fewer operator calls below it.
_SPARSE_MIN_TOKENS = 64


class MixtureLinear(SequenceRouting, AdapterLayer):
    """A frozen ``nn.Linear`` plus ``E_l`` routed LoRA experts and ``E_id`` identity experts.

    Parameters:
        lora_A: (E_l, r, d_in); lora_B: (E_l, d_out, r); router: (E_l + E_id, d_in).
    Buffers:
        expert_scaling: (E_l,) the ``s = alpha / r`` of each expert (experts built from different
        adapters may differ); ``clusters.*``: the sliding-clustering state (SLIM only).
    """

    kind = "mixture"
    routed = True

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
        self.clusters = self._new_clusters(config, layer_index, device) if config.uses_clustering else None
        # prompt-level yielding (pooling.py): the running mean of d over each sequence drives it
        self.pool = (
            PromptPool(config.yield_skip, config.cluster_momentum)
            if self.clusters is not None and config.yield_pooling == "prompt"
            else None
        )
        # sample-level yielding (gate.py): moments of the training prompts' pooled distance
        self.gate_moments = RunningMoments(config.cluster_momentum) if config.uses_sample_gate else None
        # per_task gate statistics: the clusters and moments of every earlier stage, frozen
        self.earlier_gates = nn.ModuleList(
            GateStatistics(
                self._new_clusters(config, layer_index, device), RunningMoments(config.cluster_momentum)
            )
            for _ in range(config.gate_earlier_tasks if config.uses_sample_gate else 0)
        )
        # stage_experts per_task: every earlier stage's experts and router, frozen (stages.py)
        self.earlier_experts = nn.ModuleList(
            StageExperts.empty_like(self)
            for _ in range(config.gate_earlier_tasks if config.stage_experts == "per_task" else 0)
        )
        self._stage_plans: dict[int, tuple[tuple, InferencePlan]] = {}
        # 0 for LoRA experts, 1 for identity experts: where the yielding shift is added
        identity_columns = torch.zeros(config.num_total_experts, dtype=dtype, device=device)
        identity_columns[config.num_experts :] = 1.0
        self.register_buffer("identity_columns", identity_columns, persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.mask_seed = config.seed * 1_000_003 + layer_index
        self._training_masks = torch.Generator().manual_seed(
            self.mask_seed
        )  # fresh masks every training step
        self._eval_masks: tuple[Tensor, Tensor, float] | None = None
        self._eval_factors: tuple[tuple, tuple[Tensor, Tensor, Tensor]] | None = None
        self._eval_router: tuple[tuple, Tensor] | None = None
        self._plan: tuple[tuple, InferencePlan] | None = None
        self._balance: Tensor | None = None
        # set by routing_diagnostics: called with this layer's routing of every forward
        self.recorder: Callable[..., None] | None = None

    def _new_clusters(self, config: AdapterConfig, layer_index: int, device: torch.device) -> SlidingClusters:
        return SlidingClusters(
            config.num_clusters,
            self.in_features,
            momentum=config.cluster_momentum,
            reduction=config.distance_reduction,
            quantile=config.distance_quantile,
            calibration=config.distance_calibration,
            seed=config.seed * 1_000_003 + layer_index,
        ).to(device)

    # ---- 1. router logits -----------------------------------------------------------------------

    def router_logits(self, x: Tensor) -> Tensor:
        """``g = W_g x`` (optionally on the RMS-normalised token). x: (T, d_in) -> (T, E_l + E_id)."""
        if self.config.router_input_norm:
            x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-6)
        return x @ self.router.T

    # ---- 2-4. clustering, distance, weight yielding, top-K --------------------------------------

    def _router_and_cross(self) -> Tensor:
        """``[W_g; -2 mu / var]`` ((E_l + E_id + N_c) x d_in), cached while neither changes at inference."""
        constants = self.clusters.constants()
        if self.training or torch.is_grad_enabled():
            return torch.cat([self.router, constants.cross])
        key = (self.router._version, self.router.data_ptr(), constants.version)
        if self._eval_router is None or self._eval_router[0] != key:
            self._eval_router = (key, torch.cat([self.router, constants.cross]))
        return self._eval_router[1]

    def route(
        self,
        x: Tensor,
        token_mask: Tensor | None,
        leading: torch.Size | None = None,
        signal: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Routing weights of every expert for every token.

        Args:
            x: (T, d_in) tokens; token_mask: (T,) bool or None; leading: the input's shape
                before flattening, (B, L) (needed by prompt pooling; default one sequence);
                signal: (T,) the yielding signal when it is decided outside the layer (the
                sample-level gate's score of each token's sequence), else None.

        Returns:
            weights (T, E_l + E_id): softmax over each token's top-K corrected logits (or its
            dynamic top-p set, ``selection.py``), 0 elsewhere; logits (T, E_l + E_id) before
            the choice; chosen (T, K) expert indices; distance (T,) the
            yielding signal: the calibrated ``d(x)``, or its pooled z-score with prompt pooling
            (None without clustering).
        """
        distance = signal
        # sample-level yielding decides outside the layer (gate.py); its clusters learn in the
        # gate's base pass only, never from the adapted tokens
        if self.clusters is None or signal is not None or self.gate_moments is not None:
            logits = self.router_logits(x)
        else:
            cross = None
            if self.config.router_input_norm or x.dtype != self.clusters.centres.dtype:
                logits = self.router_logits(x)
            else:
                # one matmul: the router logits and the clustering's cross term x (-2 mu / var)^T
                both = x @ self._router_and_cross().T
                logits, cross = (
                    both[:, : self.config.num_total_experts],
                    both[:, self.config.num_total_experts :],
                )
                cross = cross.detach()
            distance, _ = self.clusters(x.detach(), token_mask, learn=self.training, cross_term=cross)
            if self.pool is not None:
                shape = leading if leading is not None else torch.Size([x.shape[0]])
                distance = self.pool(distance, shape, self.context, learn=self.training)
        if distance is not None:
            # Eq. 4: identity experts' logits grow with the distance from the fine-tuning data,
            # so tokens that look out of distribution yield to the base layer.
            logits = torch.addcmul(
                logits,
                distance.to(logits.dtype)[:, None],
                self.identity_columns,
                value=self.config.yield_scale,
            )
        weights, chosen = select_experts(logits, self.config.top_k, self.config.top_p)
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

    def expert_factors(self, experts: StageExperts | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Stacked expert factors as used this forward (of an earlier stage's ``experts`` if given).

        Returns:
            a (E_l r, d_in), b (E_l r, d_out) and scales (E_l,) = ``s_e lambda / f`` (``s_e``
            without merging): the update of expert e is ``scale_e b_e^T a_e``, masks of step 6 applied.
        """
        source = self if experts is None else experts
        lora_a, lora_b, factor = source.lora_A, source.lora_B, 1.0
        if self._merging_active():
            input_mask, output_mask, rescale = self._masks()
            lora_a, lora_b = masked_experts(lora_a, lora_b, input_mask, output_mask)
            factor = self.config.merge_scale * rescale
        experts, rank = self.config.num_experts, self.config.r
        a = lora_a.reshape(experts * rank, self.in_features)
        b = lora_b.transpose(1, 2).reshape(experts * rank, self.out_features)
        return a, b, source.expert_scaling * factor

    def _cached_expert_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """At inference without autograd the masked factors are built once, not every token."""
        if self.training or torch.is_grad_enabled():
            return self.expert_factors()
        parts = (self.lora_A, self.lora_B, self.expert_scaling)
        key = tuple(t._version for t in parts) + tuple(t.data_ptr() for t in parts) + (id(self.config),)
        if self._eval_factors is None or self._eval_factors[0] != key:
            self._eval_factors = (key, self.expert_factors())
        return self._eval_factors[1]

    def train(self, mode: bool = True) -> MixtureLinear:
        self._eval_factors = self._eval_router = self._plan = None
        self._stage_plans = {}
        return super().train(mode)

    def after_load(self) -> None:
        self._eval_factors = self._eval_router = self._plan = None
        self._stage_plans = {}

    def __getstate__(self) -> dict:
        # copies and pickles leave out per-forward values (the balance loss is part of a graph)
        state = super().__getstate__()
        state = dict(
            state,
            _balance=None,
            _eval_factors=None,
            _eval_router=None,
            _plan=None,
            _stage_plans={},
            recorder=None,
        )
        return state

    # ---- 5. output --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        result = self.base_layer(x)
        if self.context.gate_pass:  # the sample-level gate's base pass: measure, add nothing
            if self.gate_moments is not None:
                self._measure_prompt(x)
            return result
        if self._all_sequences_yield(x):  # the base model, decided once per set of sequences
            return result
        leading = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        token_mask = self.context.token_mask(leading)
        signal, active, stage = self._sample_signal(leading)
        if active is not None:  # some sequences yield fully: only the others reach the experts
            if self.recorder is not None:
                self._record_yielded(active, signal, token_mask)
            if not bool(active.any()):
                return result
            tokens, signal = tokens[active], signal[active]
            stage = None if stage is None else stage[active]
            token_mask = None if token_mask is None else token_mask[active]
        if stage is not None and bool((stage < len(self.earlier_experts)).any()):
            update = self._staged_update(tokens, token_mask, leading, signal, stage)
        else:
            update = self._update(tokens, token_mask, leading, signal)
        if active is not None:
            update = update.new_zeros(active.shape[0], self.out_features).index_put_((active,), update)
        return result + update.view(*leading, self.out_features).to(result.dtype)

    def _update(
        self, tokens: Tensor, token_mask: Tensor | None, leading: torch.Size, signal: Tensor | None
    ) -> Tensor:
        """The current experts' contribution: the folded plan for few tokens, else steps 1-6."""
        if self._use_inference_plan(tokens):
            return inference_update(self, self._inference_plan(), tokens, signal)
        return self._routed_update(tokens, token_mask, leading, signal)

    def _routed_update(
        self, tokens: Tensor, token_mask: Tensor | None, leading: torch.Size, signal: Tensor | None
    ) -> Tensor:
        """Steps 1-6 on (T, d_in) tokens -> (T, d_out), recording routing for diagnostics."""
        weights, logits, chosen, distance = self.route(tokens, token_mask, leading, signal)
        a, b, scales = self._cached_expert_factors()
        inputs = self.dropout(tokens) if self.config.dropout > 0 else tokens
        if self._sparse_pays(tokens):
            update = self._experts_sparse(inputs, weights, chosen, a, b, scales)
        else:
            update = self._experts_dense(inputs, weights, a, b, scales)
        if self.training and self.config.balance_weight > 0:
            rows = leading[:-1].numel() if len(leading) > 1 else 1
            self._balance = self._balance_term(logits, weights, chosen, token_mask, rows)
        if self.recorder is not None:
            self.recorder(self, weights.detach(), chosen, distance, token_mask)
        return update

    def _sparse_pays(self, tokens: Tensor) -> bool:
        """Whether the per-expert sparse path beats one dense product over all experts.

        Not on CPU while each token uses at least a quarter of the experts (SLIM's and MoE-LoRA's
        top-2 of 8): there the dense product was faster at every size measured, 64 to 2048
        tokens, with and without autograd (benchmarks/expert_paths.py, results in
        benchmarks/results/expert_paths.json): the per-expert gathers, small matmuls and scatter
        cost more than the experts' FLOPs they save. Sparser mixtures (not measured) and
        accelerators (not measured here) go sparse from ``_SPARSE_MIN_TOKENS`` tokens on.
        """
        config = self.config
        if config.top_k >= config.num_experts and config.top_p is None:
            return False  # every expert runs on every token: nothing to skip
        if tokens.device.type == "cpu" and config.num_experts <= 4 * config.top_k:
            return False
        return tokens.shape[0] >= _SPARSE_MIN_TOKENS

    def _use_inference_plan(self, tokens: Tensor) -> bool:
        """Few tokens at inference without autograd or diagnostics: the folded path (inference.py)."""
        if self.training or self.recorder is not None or torch.is_grad_enabled():
            return False
        if self.pool is not None:  # the folded path shifts logits by each token's own distance
            return False
        if self.gate_moments is not None and self.config.uses_sample_gate:
            return tokens.shape[0] < _SPARSE_MIN_TOKENS and not self.config.router_input_norm
        if tokens.shape[0] >= _SPARSE_MIN_TOKENS or self.config.router_input_norm:
            return False
        return self.clusters is None or tokens.dtype == self.clusters.centres.dtype

    def _inference_plan(self) -> InferencePlan:
        parts = (self.router, self.lora_A, self.lora_B, self.expert_scaling)
        key = tuple(t._version for t in parts) + tuple(t.data_ptr() for t in parts) + (id(self.config),)
        if self.clusters is not None:
            key += self.clusters.constants().version
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, build_plan(self))
        return self._plan[1]

    def _experts_dense(self, inputs: Tensor, weights: Tensor, a: Tensor, b: Tensor, scales: Tensor) -> Tensor:
        return dense_update(inputs, weights, a, b, scales, self.config.num_experts, self.config.r)

    def _experts_sparse(
        self, inputs: Tensor, weights: Tensor, chosen: Tensor, a: Tensor, b: Tensor, scales: Tensor
    ) -> Tensor:
        config = self.config
        top_p = config.top_p is not None
        return sparse_update(inputs, weights, chosen, a, b, scales, config.num_experts, config.r, top_p)

    # ---- 7-8. regularisers (regularisers.py) ----------------------------------------------------

    def l1_penalty(self) -> Tensor:
        return l1_penalty(self.lora_A, self.lora_B)

    def _balance_term(
        self, logits: Tensor, weights: Tensor, chosen: Tensor, token_mask: Tensor | None, rows: int
    ) -> Tensor:
        """The balance loss of this forward in the config's ``balance_form``."""
        config = self.config
        if config.balance_form == "localized":
            return localized_balance(weights, token_mask, rows, config.num_experts, config.balance_delta)
        return load_balance(logits, weights, chosen, token_mask, config.num_experts, config.top_p is not None)

    def balance_loss(self) -> Tensor | None:
        return self._balance


ADAPTER_LAYERS.register("moe_lora", MixtureLinear)
ADAPTER_LAYERS.register("slim", MixtureLinear)
