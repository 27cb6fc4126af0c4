"""MixLoRA-Dy: MixLoRA's mixture of LoRA experts with dynamic top-p routing (a SLIM paper baseline).

The SLIM paper (Tab. 1-2) compares against MixLoRA (Li et al. 2024, "MixLoRA: Enhancing Large
Language Models Fine-Tuning with LoRA-based Mixture of Experts") with top-K routing, our
``moe_lora``, and against its dynamic variant, MixLoRA-Dy: each token takes the experts in order of
router probability until their cumulative probability reaches ``top_p`` (``adapters/selection.py``),
so a confident router spends one expert on a token and an unsure one several. Defaults: 8 LoRA
experts of rank 16 as in the SLIM paper's comparison, ``top_p`` 0.8 and at most all 8 experts per
token (``top_k`` 8: the cut is the probability, not a count). ``top_p`` 0.8 is our choice: the
paper does not state its threshold. Everything else as ``moe_lora``: one adapter continued stage
after stage, with the load-balancing loss counted over the experts a token really takes.
"""

from __future__ import annotations

from forgetless.strategies import register_strategy
from forgetless.strategies.moe_lora import MoELoRA


@register_strategy("mixlora_dy")
class MixLoRADy(MoELoRA):
    """MoE-LoRA with dynamic top-p routing; params are AdapterConfig fields (top_p, top_k, r ...)."""

    adapter_defaults = {"top_p": 0.8, "top_k": 8}
