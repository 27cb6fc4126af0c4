"""LoRAMoE: dense-routed LoRA experts with the localized balancing constraint (a SLIM paper baseline).

LoRAMoE (Dou et al. 2024, "LoRAMoE: Alleviating World Knowledge Forgetting in Large Language Models
via MoE-Style Plugin") puts LoRA experts beside the frozen feed-forward layers and mixes *all* of
them for every token with a softmax router (no top-K), trained with its localized balancing
constraint: the experts are split into a world-knowledge half and a task half, and the squared
coefficient of variation of their type-weighted importance is added to the loss
(``adapters/regularisers.py``, which also says what the published definition does and which type
our training samples take). Defaults as the SLIM paper's comparison (rank 16, 8 experts, the MLP
projections) and the LoRAMoE paper's constraint (delta 0.1, weight 0.1). Everything else as
``moe_lora``: one adapter continued stage after stage. Params are AdapterConfig fields.
"""

from __future__ import annotations

from typing import Any

from forgetless.adapters.config import AdapterConfig
from forgetless.strategies import register_strategy
from forgetless.strategies.moe_lora import MoELoRA


@register_strategy("loramoe")
class LoRAMoE(MoELoRA):
    """Every LoRA expert on every token (top_k = num_experts) with LoRAMoE's localized balance."""

    adapter_defaults = {"balance_form": "localized", "balance_weight": 0.1, "balance_delta": 0.1}

    def adapter_settings(self) -> dict[str, Any]:
        fields = super().adapter_settings()
        if "top_k" not in fields:  # dense routing, whatever the number of experts
            experts = fields.get("num_experts") or AdapterConfig.moe_lora().num_experts
            fields["top_k"] = experts + int(fields.get("num_identity_experts") or 0)
        return fields
