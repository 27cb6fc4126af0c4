"""Gated per-task LoRA: one LoRA per stage, chosen per prompt by an out-of-distribution gate (ABSCL-style).

ABSCL (Yu et al. 2024, "Boosting Large Language Models with Continual Learning for Aspect-based
Sentiment Analysis") trains a task-specific adapter per task and, at inference, picks the adapter
whose training prompts are nearest to the input (a Mahalanobis distance of its hidden state). This
is the same idea on SLIM's machinery, without anything else of SLIM: one LoRA expert (top-1, which
is exactly LoRA), no identity experts, no masking, no L1 or balance loss, behind SLIM's
sample-level gate with per-task statistics and per-stage experts (``adapters/gate.py``,
``adapters/stages.py``). Each stage trains its own LoRA (warm-started from the previous stage's,
then frozen when the next stage opens); a prompt runs the LoRA of its nearest stage, or the base
model when it is far from every stage (gate score above ``yield_threshold``).

The gate's statistic is not ABSCL's: the mean over a prompt's content tokens of each adapted
layer's calibrated distance to its sliding clusters, z-scored per stage and averaged over layers,
rather than the Mahalanobis distance of one hidden state. It is the statistic docs/results.md
measured (general prompts ranked above every learned task's, AUC 1.000 on the built-in sequence).
What it tells a reader: how much of SLIM's result a bare switch between plain LoRAs already gets.
Params are AdapterConfig fields (r, alpha, yield_threshold ...).
"""

from __future__ import annotations

from forgetless.strategies import register_strategy
from forgetless.strategies.moe_lora import MoELoRA


@register_strategy("gated_lora")
class GatedLoRA(MoELoRA):
    """A LoRA per stage behind SLIM's per-task sample-level gate; params are AdapterConfig fields."""

    adapter_defaults = {
        "num_experts": 1,
        "top_k": 1,
        "yield_pooling": "sample",
        "gate_statistics": "per_task",
        "stage_experts": "per_task",
        "balance_weight": 0.0,
    }
