"""What a SLIM layer does per sequence: the sample-level gate's measurements and per-stage experts.

``MixtureLinear`` (slim.py) is per token; this mixin holds its per-sequence side (gate.py for the
gate, stages.py for per-stage experts): measuring a prompt in the gate's base pass, freezing a
stage's gate statistics and experts when the next stage opens, the per-sequence yielding signal,
and running each sequence on the experts of its nearest stage.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from forgetless.adapters.config import AdapterConfig
from forgetless.adapters.gate import GateStatistics, RunningMoments, pooled_distance
from forgetless.adapters.inference import InferencePlan, build_plan, inference_update
from forgetless.adapters.stages import StageExperts, split_by_stage


class SequenceRouting:
    """Mixin of ``MixtureLinear``: the per-sequence part of its routing."""

    def open_gate_task(self, config: AdapterConfig) -> None:
        """Freeze this stage's gate statistics among the earlier ones and start empty ones
        (``gate.open_gate_task``; ``config`` counts the frozen stages)."""
        device = self.clusters.centres.device
        self.earlier_gates.append(GateStatistics(self.clusters, self.gate_moments))
        if config.stage_experts == "per_task":
            self.earlier_experts.append(StageExperts.snapshot(self))
        self.clusters = self._new_clusters(config, self.mask_seed - config.seed * 1_000_003, device)
        self.gate_moments = RunningMoments(config.cluster_momentum).to(device)
        self.config = config

    # ---- 3-4, sample level: one yielding signal per sequence (gate.py) ---------------------------

    def _sample_signal(self, leading: torch.Size) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gate's score of each token's sequence (T,), which tokens still reach the experts
        (T,) bool (None when all do), and the nearest stage of each token's sequence (T,) long
        (None without earlier stages' experts); all None unless this layer yields per sample.

        In training every sequence reaches the current experts: training data is in-domain by
        definition, and a new task's prompts, far from the earlier tasks', must not yield before
        they are learned (the clusters and moments still learn them, from the gate's base pass:
        ``fitted_gate`` in our loop, every training forward in a loop of one's own).
        """
        if self.gate_moments is None or not self.config.uses_sample_gate or self.training:
            return None, None, None
        batch, length = (1, leading[0]) if len(leading) == 1 else (leading[0], leading[-1])
        gate = self.context.gate
        scores = gate.row_scores(batch)
        signal = scores[:, None].expand(batch, length).reshape(-1).to(self.lora_A.dtype)
        active = signal < self.config.yield_threshold
        stage = None
        if len(self.earlier_experts):
            stage = gate.row_stages(batch)[:, None].expand(batch, length).reshape(-1)
        return signal, (None if bool(active.all()) else active), stage

    def _all_sequences_yield(self, x: Tensor) -> bool:
        """At inference with the sample gate: every running sequence yields fully, so this layer
        is its base layer (what ``forward`` finds token by token, without the work). x: (B, L, d)
        or (L, d); a batch that does not match the running sequences takes the checked path."""
        if self.training or self.recorder is not None or self.gate_moments is None:
            return False
        gate = self.context.gate
        if gate is None or not self.config.uses_sample_gate or gate.scores is None:
            return False
        if gate.scores.shape[0] != (x.shape[0] if x.dim() > 2 else 1):
            return False
        return gate.all_yield(self.config.yield_threshold, self.lora_A.dtype)

    @torch.no_grad()
    def _measure_prompt(self, x: Tensor) -> None:
        """Gate pass: pool the calibrated distance of the prompt's content tokens per sequence to
        the current stage's clusters (learning them and their moments in train mode) and to every
        earlier stage's, and report the (S, B) z-scores (S = earlier stages + the current one)."""
        content = self.context.content_mask
        if content is None or tuple(content.shape) != tuple(x.shape[:-1]):
            raise RuntimeError("sample-level yielding needs (batch, seq) inputs matching the content mask")
        tokens = x.reshape(-1, self.in_features)[content.reshape(-1)].to(self.clusters.centres.dtype)
        pooled = pooled_distance(self.clusters, tokens, content, learn=self.training)
        if self.training:
            self.gate_moments.update(pooled[content.any(dim=1)])
        stages = [
            (gate.moments, pooled_distance(gate.clusters, tokens, content, learn=False))
            for gate in self.earlier_gates
        ] + [(self.gate_moments, pooled)]
        scores = [moments.standardise(values).float() for moments, values in stages]
        if len(stages) > 1:  # a stage without statistics (not trained yet) is no evidence
            scores = [
                torch.full_like(z, math.inf) if int(moments.batches) == 0 else z
                for z, (moments, _) in zip(scores, stages)
            ]
        self.context.gate_scores.append(torch.stack(scores))

    def _record_yielded(self, active: Tensor, signal: Tensor, token_mask: Tensor | None) -> None:
        """Diagnostics see a fully yielded token as routed to the identity experts alone."""
        yielded = ~active
        if not bool(yielded.any()):
            return
        count, num_lora = int(yielded.sum()), self.config.num_experts
        weights = signal.new_zeros(count, self.config.num_total_experts)
        weights[:, num_lora:] = 1.0 / self.config.num_identity_experts
        identity = torch.arange(num_lora, self.config.num_total_experts, device=signal.device)
        chosen = identity.repeat(self.config.top_k)[: self.config.top_k].expand(count, -1)
        mask = None if token_mask is None else token_mask[yielded]
        self.recorder(self, weights, chosen, signal[yielded], mask)

    def _staged_update(
        self, tokens: Tensor, token_mask: Tensor | None, leading: torch.Size, signal: Tensor, stage: Tensor
    ) -> Tensor:
        """``stage_experts: per_task`` at inference: the tokens of each sequence run the experts
        of the sequence's nearest stage (stages.py); the current stage's run ``_update``."""
        current = len(self.earlier_experts)
        update = tokens.new_zeros(tokens.shape[0], self.out_features)
        for index, rows in split_by_stage(stage, current):
            mask = None if token_mask is None else token_mask[rows]
            if index == current:
                part = self._update(tokens[rows], mask, leading, signal[rows])
            else:
                plan = self._stage_plan(index)
                part, weights, chosen = inference_update(self, plan, tokens[rows], signal[rows], routing=True)
                if self.recorder is not None:
                    self.recorder(self, weights, chosen, signal[rows], mask)
            update.index_copy_(0, rows, part.to(update.dtype))
        return update

    def _stage_plan(self, index: int) -> InferencePlan:
        """The folded plan of earlier stage ``index``'s frozen experts, built once."""
        experts = self.earlier_experts[index]
        key = experts.key() + (id(self.config),)
        cached = self._stage_plans.get(index)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._stage_plans[index] = (key, build_plan(self, experts))
        return cached[1]
