"""MoE-LoRA (MixLoRA-style) baseline: a mixture of LoRA experts with a learned top-K router.

SLIM without identity experts, weight yielding or masking (``AdapterConfig.moe_lora``): it tells
how much of SLIM's retention comes from its identity experts. Trained stage after stage with one
adapter, plus the load-balancing loss (``balance_weight``). Params are AdapterConfig fields.
"""

from __future__ import annotations

from forgetless.strategies import register_strategy
from forgetless.strategies.slim import SLIM


@register_strategy("moe_lora")
class MoELoRA(SLIM):
    """Mixture of LoRA experts continued task after task, with its balance loss."""

    adapter_kind = "moe_lora"
