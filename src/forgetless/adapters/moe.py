"""A mixture layer built from already trained LoRA adapters (MoE mixing of one-round adapters).

Each given adapter becomes one frozen LoRA expert of a ``moe_lora`` layer; only the router is
trainable. Adapters of different ranks are stacked by padding with zero rows of A / columns of B
(which add nothing), and each keeps its own scaling in ``expert_scaling``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from forgetless.adapters.config import AdapterConfig
from forgetless.adapters.inject import adapter_layers, inject_adapters
from forgetless.adapters.lora import pad_rank
from forgetless.errors import InputError

Factors = dict[str, tuple[Tensor, Tensor, float]]


def build_lora_moe(
    model: nn.Module,
    experts: list[Factors],
    top_k: int,
    num_identity_experts: int = 0,
    router_init: dict[str, Tensor] | None = None,
    **config_fields: object,
) -> list[str]:
    """Wrap every module that has LoRA factors in all ``experts`` in one mixture layer.

    Args:
        experts: one dict per adapter, module name -> (A (r x d_in), B (d_out x r), scaling), as
            returned by ``lora_factors``; modules missing from any expert are left alone.
        top_k: experts active per token.
        num_identity_experts: identity experts appended after the LoRA experts.
        router_init: module name -> router weight ((len(experts) + num_identity_experts) x d_in);
            modules not given start with a zero router (equal logits: the first K experts, 1/K each).
        config_fields: further ``AdapterConfig`` fields (e.g. ``balance_weight``).

    Returns:
        The wrapped module names. The experts are frozen; the routers are the trainable parameters.

    Raises:
        InputError: no module is common to all experts, shapes do not fit the model, or a
            router_init has the wrong shape.
    """
    if not experts:
        raise InputError("experts is empty; give at least one adapter's lora_factors")
    common = [name for name in experts[0] if all(name in expert for expert in experts[1:])]
    if not common:
        raise InputError("the adapters share no module; mix adapters trained with the same target_modules")
    rank = max(int(expert[name][0].shape[0]) for expert in experts for name in common)
    config = AdapterConfig.from_dict(
        dict(
            config_fields,
            kind="moe_lora",
            r=rank,
            alpha=float(rank),
            num_experts=len(experts),
            num_identity_experts=num_identity_experts,
            top_k=top_k,
            train_experts=False,
            router_init_std=0.0,
            target_modules=[re.escape(name) for name in common],
        ),
        source="build_lora_moe",
    )
    _check_shapes(model, experts, common, router_init, config.num_total_experts)
    names = inject_adapters(model, config)
    layers = adapter_layers(model)
    with torch.no_grad():
        for name in names:
            layer = layers[name]
            for index, expert in enumerate(experts):
                a, b, scaling = expert[name]
                a, b = pad_rank(a.detach(), b.detach(), rank)
                layer.lora_A[index].copy_(a)
                layer.lora_B[index].copy_(b)
                layer.expert_scaling[index] = float(scaling)
            if router_init is not None and name in router_init:
                layer.router.copy_(router_init[name])
    return names


def _check_shapes(
    model: nn.Module,
    experts: list[Factors],
    modules: list[str],
    router_init: dict[str, Tensor] | None,
    num_total: int,
) -> None:
    """Every factor and router fits its module, checked before the model is touched."""
    for name in modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputError(
                f"{name} is not a module of this model; the adapters are for another model"
            ) from None
        d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        for index, expert in enumerate(experts):
            a, b, _ = expert[name]
            if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise InputError(
                    f"expert {index}: {name} has A {list(a.shape)} and B {list(b.shape)}, which do not fit "
                    f"a {d_in} -> {d_out} layer; the adapter is for another model"
                )
        if router_init is not None and name in router_init:
            shape = list(router_init[name].shape)
            if shape != [num_total, d_in]:
                raise InputError(
                    f"router_init[{name}] has shape {shape}; it needs {[num_total, d_in]} "
                    "(LoRA + identity experts x d_in)"
                )
