"""Put adapters into a Hugging Face causal LM, read them back out, and fold LoRA into the base.

Targets are matched on module names: a plain name matches as a suffix (``gate_proj`` matches
``model.layers.0.mlp.gate_proj``), anything with regex characters is matched against the whole
name (``model\\.layers\\.[0-3]\\.mlp\\..*``). Only ``nn.Linear`` modules are wrapped.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from forgetless.adapters.base import ADAPTER_LAYERS, AdapterLayer, TokenContext
from forgetless.adapters.config import AdapterConfig
from forgetless.errors import InputError

_PLAIN_NAME = re.compile(r"^[\w.]+$")
_HOOK_ATTR = "_forgetless_adapter_hook"
_CONTEXT_ATTR = "_forgetless_token_context"


def _matches(name: str, target: str) -> bool:
    if _PLAIN_NAME.match(target):
        return name == target or name.endswith("." + target)
    return re.fullmatch(target, name) is not None


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Module name -> adapter layer, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def _example_names(model: nn.Module, limit: int = 8) -> str:
    """A few distinct nn.Linear names (layer numbers folded to N) for error messages."""
    seen: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            folded = re.sub(r"\.\d+\.", ".N.", name)
            if folded not in seen:
                seen.append(folded)
    return ", ".join(seen[:limit]) or "(none)"


def find_target_modules(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules matched by ``target_modules`` (model order).

    Raises:
        InputError: nothing matches (the message lists names that exist), or a match is already
            an adapter layer (merge it first).
    """
    inside_adapter: set[str] = set()
    names = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_adapter):
            continue  # the base_layer inside an adapter is not a target of its own
        if isinstance(module, AdapterLayer):
            inside_adapter.add(name)
            if any(_matches(name, target) for target in target_modules):
                raise InputError(
                    f"{name} already has a {module.kind} adapter; merge_adapters(model) first "
                    "or load the model fresh"
                )
            continue
        if isinstance(module, nn.Linear) and any(_matches(name, target) for target in target_modules):
            names.append(name)
    if not names:
        raise InputError(
            f"target_modules {target_modules} match no nn.Linear module of this model; "
            f"modules that exist: {_example_names(model)}"
        )
    return names


def _capture_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: hand the batch's attention mask and token ids to the adapter layers, and
    let the sample-level gate score the sequences that start here (gate.py).

    Reads the context from the module (not a closure) so that a deep copy of the model feeds
    its own copied context.
    """
    context = getattr(module, _CONTEXT_ATTR, None)
    if context is None or context.gate_pass:
        return
    mask = kwargs.get("attention_mask")
    context.attention_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
    ids = kwargs.get("input_ids", args[0] if args else None)
    context.input_ids = ids if isinstance(ids, Tensor) and ids.dim() == 2 else None
    if context.gate is not None:
        context.gate.before_forward(module, context, args, kwargs)


def gated_modules(model: nn.Module) -> list[tuple[nn.Module, TokenContext]]:
    """The modules of ``model`` whose forward pre-hook fills a ``TokenContext``, with it."""
    found = []
    for module in model.modules():
        context = getattr(module, _CONTEXT_ATTR, None)
        if context is not None:
            found.append((module, context))
    return found


def _token_context(model: nn.Module) -> TokenContext:
    """The model's shared TokenContext, installing the pre-hook that fills it on first use."""
    context = getattr(model, _CONTEXT_ATTR, None)
    if context is None:
        context = TokenContext()
        handle = model.register_forward_pre_hook(_capture_mask, with_kwargs=True)
        object.__setattr__(model, _CONTEXT_ATTR, context)
        object.__setattr__(model, _HOOK_ATTR, handle)
    return context


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_adapters(model: nn.Module, config: AdapterConfig, tokenizer=None) -> list[str]:  # noqa: ANN001
    """Wrap every target ``nn.Linear`` of ``model`` in the adapter layer of ``config.kind``.

    With sample-level yielding (SLIM's default) and a ``tokenizer``, the chat template's fixed
    parts are read from it into the config (``template_prefix_ids`` / ``template_suffix_ids``)
    unless set, so that the gate pools over each prompt's own content.

    Every parameter of the model outside the new adapters is frozen (``requires_grad=False``).
    Initialisation is seeded by ``config.seed`` (the same seed gives the same adapters).

    Returns:
        The wrapped module names, in model order.

    Raises:
        InputError: no module matches ``config.target_modules`` (the message lists names that exist).
    """
    layer_class = ADAPTER_LAYERS.get(config.kind)
    if config.uses_sample_gate and tokenizer is not None and not config.template_prefix_ids:
        from forgetless.data.formatting import PromptFormatter

        prefix, suffix = PromptFormatter(tokenizer).template_parts()
        config = config.model_copy(update={"template_prefix_ids": prefix, "template_suffix_ids": suffix})
    names = find_target_modules(model, config.target_modules)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    context = _token_context(model)
    if config.uses_sample_gate:
        from forgetless.adapters.gate import SequenceGate

        context.gate = SequenceGate(config.template_prefix_ids, config.template_suffix_ids)
    generator = torch.Generator().manual_seed(config.seed)
    for index, (name, module_config) in enumerate(zip(names, config.for_modules(names))):
        base = model.get_submodule(name)
        layer = layer_class(base, module_config, context, generator, layer_index=index)
        layer.train(base.training)  # a new module starts in train mode; follow the model's mode
        _set_module(model, name, layer)
    return names


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimiser should see: adapter (and router) parameters with ``requires_grad``."""
    parameters = []
    for layer in adapter_layers(model).values():
        for name, parameter in layer.named_parameters():
            if not name.startswith("base_layer.") and parameter.requires_grad:
                parameters.append(parameter)
    return parameters


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor (experts, router, cluster state), keyed ``<module name>.<tensor name>``."""
    state = {}
    for name, layer in adapter_layers(model).items():
        for key, tensor in layer.adapter_state().items():
            state[f"{name}.{key}"] = tensor
    return state


def adapter_regularization(model: nn.Module) -> Tensor:
    """``l1_weight * sum_layers L1 + balance_weight * mean_layers balance`` for the last forward.

    The L1 term is the SLIM paper's L1 penalty on A and B (step 7 of slim.py's docstring); the
    balance term is the load-balancing loss of each routing
    layer's last training forward. An exact zero tensor when both weights are 0 (or no adapter).
    """
    layers = list(adapter_layers(model).values())
    total = torch.zeros(())
    if not layers:
        return total
    total = total.to(next(iter(layers[0].parameters())).device)
    l1_terms = [layer.l1_penalty() * layer.config.l1_weight for layer in layers if layer.config.l1_weight > 0]
    if l1_terms:
        total = total + torch.stack(l1_terms).sum()
    balance_terms = []
    for layer in layers:
        loss = layer.balance_loss() if layer.config.balance_weight > 0 else None
        if loss is not None:
            balance_terms.append(loss * layer.config.balance_weight)
    if balance_terms:
        total = total + torch.stack(balance_terms).mean()
    return total


def lora_factors(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Module name -> (A (r x d_in), B (d_out x r), scaling) for every plain-LoRA layer.

    The tensors are the live parameters (gradients flow through them: O-LoRA's penalty uses them).

    Raises:
        InputError: the model has adapters but none of kind lora.
    """
    layers = adapter_layers(model)
    factors = {name: layer.low_rank_factors() for name, layer in layers.items() if layer.single_delta}
    if layers and not factors:
        kinds = sorted({layer.kind for layer in layers.values()})
        raise InputError(
            f"the model's adapters are of kind {', '.join(kinds)}, not lora; they have no single A/B"
        )
    return factors


def _drop_hook_if_unused(model: nn.Module) -> None:
    if adapter_layers(model):
        return
    handle = getattr(model, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        object.__delattr__(model, _HOOK_ATTR)
        object.__delattr__(model, _CONTEXT_ATTR)


def remove_adapters(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Discard adapters (all, or those at ``names``) and put the untouched base layers back."""
    layers = adapter_layers(model)
    for name in layers if names is None else names:
        if name in layers:
            _set_module(model, name, layers[name].base_layer)
    _drop_hook_if_unused(model)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer's ``s B A`` into its base weight and put the plain ``nn.Linear`` back.

    After this the model has no adapters and a fresh one can be injected (sequential LoRA).

    Raises:
        InputError: a layer is a mixture (moe_lora / slim): its routed output is not one matrix.
    """
    layers = adapter_layers(model)
    for name, layer in layers.items():
        if not layer.single_delta:
            raise InputError(
                f"{name} is a {layer.kind} adapter: a routed mixture does not reduce to one weight; "
                "only kind lora can be merged"
            )
    for name, layer in layers.items():
        base = layer.base_layer
        with torch.no_grad():
            base.weight += layer.delta_weight().to(base.weight.dtype)
        _set_module(model, name, base)
    _drop_hook_if_unused(model)
    return model


#: AdapterConfig fields that only decide how a trained routed adapter is applied, not what it
#: learned (masking is inference-only unless ``mask_in_training``): they can be changed on a
#: loaded adapter, so sweeping them needs no retraining.
INFERENCE_FIELDS = ("mask_ratio", "merge_scale", "yield_scale", "yield_threshold", "top_k")


def set_inference_options(model: nn.Module, **options: float | int) -> dict[str, float | int]:
    """Change inference-time settings of every routed (moe_lora / slim) layer of ``model``.

    Args:
        options: any of ``INFERENCE_FIELDS`` (validated as ``AdapterConfig`` fields).

    Returns:
        The previous values (of the first routed layer), so ``set_inference_options(model, **old)``
        restores them.

    Raises:
        InputError: an unknown option, a model without routed layers, or yielding asked of an
            adapter that has no sliding-clustering state.
    """
    from forgetless.registry import did_you_mean

    for key in options:
        if key not in INFERENCE_FIELDS:
            raise InputError(
                f"inference option '{key}' is unknown.{did_you_mean(key, list(INFERENCE_FIELDS))} "
                f"Valid options: {', '.join(INFERENCE_FIELDS)}"
            )
    layers = {name: layer for name, layer in adapter_layers(model).items() if layer.routed}
    if not layers:
        raise InputError(
            "the model has no moe_lora or slim adapter layers; inference options change those only"
        )
    previous: dict[str, float | int] = {}
    for name, layer in layers.items():
        before = layer.config
        after = AdapterConfig.from_dict({**before.model_dump(), **options}, source="inference options")
        if after.uses_clustering and layer.clusters is None:
            raise InputError(
                f"{name}: yield_scale > 0 needs sliding-clustering state, which this adapter was trained "
                "without (no identity experts or yield_scale 0)"
            )
        previous = previous or {key: getattr(before, key) for key in options}
        layer.config = after
        layer._eval_masks = None  # masks depend on mask_ratio; the other caches key on the config
        layer.after_load()
    return previous
