"""MoLA: a mixture of LoRA experts with more experts in higher layers (a SLIM paper baseline).

MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts") gives each layer its own number of
LoRA experts. Of its allocations, the one its title names did best: few experts in the lowest
layers and more going up. Our default is that shape, 2 / 4 / 6 / 8 experts over four equal groups
of the adapted layers (``layer_experts``, ``AdapterConfig.for_modules``), with top-2 routing and
rank 16 (the SLIM paper's comparison: rank 16, at most 8 experts). Everything else as
``moe_lora``: one adapter continued stage after stage, with the load-balancing loss.
Params are AdapterConfig fields (``layer_experts``, ``top_k``, ``r`` ...).
"""

from __future__ import annotations

from forgetless.strategies import register_strategy
from forgetless.strategies.moe_lora import MoELoRA


@register_strategy("mola")
class MoLA(MoELoRA):
    """MoE-LoRA with layer-wise expert counts; params are AdapterConfig fields."""

    adapter_defaults = {"layer_experts": [2, 4, 6, 8], "top_k": 2}
