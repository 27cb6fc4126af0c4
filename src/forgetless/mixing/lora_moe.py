"""LoRA-MoE: trained LoRA adapters become the frozen experts of one routed layer per module.

The layer is the adapters package's mixture layer (``forgetless.adapters.build_lora_moe``, the
same layer SLIM and MixLoRA-style MoE-LoRA use), optionally with identity experts; only its
router is set here (training-free rows, or trained rows). Experts are the adapters' dense
factors ``(A, B, scaling)`` read from their PEFT files.
"""

from __future__ import annotations

from torch import Tensor

from forgetless.errors import InputError
from forgetless.merging.sources import LoraAdapter

Factors = dict[str, tuple[Tensor, Tensor, float]]


def expert_factors(adapters: list[LoraAdapter]) -> list[Factors]:
    """Per adapter: module -> (A (r x d_in), B (d_out x r), scaling), float32."""
    experts = []
    for adapter in adapters:
        factors: Factors = {}
        for module, info in adapter.modules.items():
            if info.fan_in_fan_out:
                raise InputError(
                    f"{adapter.spec}: fan_in_fan_out (Conv1D) adapters cannot be mixed; use Linear layers"
                )
            a, b = info.factors(adapter.reader)
            factors[module] = (a, b, info.scaling)
        experts.append(factors)
    return experts


def router_points(experts: list[Factors]) -> dict[str, int]:
    """Modules adapted by every expert (the ones the mixture wraps) -> their ``d_in``."""
    common = [name for name in experts[0] if all(name in expert for expert in experts[1:])]
    if not common:
        raise InputError(
            "the adapters share no adapted module; mix adapters trained with the same target_modules"
        )
    return {name: int(experts[0][name][0].shape[1]) for name in common}


__all__ = ["expert_factors", "router_points"]
