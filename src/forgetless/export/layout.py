"""What a loaded model exports as: no adapter, one LoRA, or one LoRA per set of SLIM / MoE-LoRA experts.

- no adapter layers (full fine-tuning, merged or mixed-into-dense models): the base folder alone;
- kind ``lora``: one adapter, exact;
- kind ``moe_lora`` / ``slim``: one adapter per expert set: ``stage0``, ``stage1`` ... with
  per-stage experts (``stage_experts: per_task``), else one. Exact when a layer has one LoRA
  expert and no identity expert (its routing weight is then always 1); otherwise the
  token-dependent routing is approximated by fixed mean weights (``experts.py``).

With the sample-level gate (``yield_pooling: sample``) the router picks an adapter, or the base
model, per prompt; every gate stage maps to the adapter of its experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from forgetless.adapters import AdapterLayer, adapter_layers
from forgetless.errors import InputError

SINGLE_NAME = "adapter"


@dataclass(frozen=True)
class ExportedAdapter:
    """One PEFT adapter of the export: its folder name, the expert set it comes from (the
    training stage of per-stage experts; None when the model has one set), its PEFT rank, and
    whether base + this adapter equals forgetless's own forward."""

    name: str
    stage: int | None
    rank: int
    exact: bool


@dataclass(frozen=True)
class Layout:
    """The adapters of a model as the export sees them.

    Attributes:
        kind: the adapter kind (``lora``, ``moe_lora``, ``slim``), None without adapters.
        layers: module name -> adapter layer (model order).
        adapters: what is written to ``adapters/``.
        gate_stages: training stages the sample-level gate tells apart (0 without the gate).
        stage_adapters: the adapter name of every gate stage.
    """

    kind: str | None
    layers: dict[str, AdapterLayer]
    adapters: list[ExportedAdapter]
    gate_stages: int
    stage_adapters: list[str]

    @property
    def gated(self) -> bool:
        return self.gate_stages > 0

    @property
    def exact(self) -> bool:
        return all(adapter.exact for adapter in self.adapters)


def _check_plain_modules(model: nn.Module) -> None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            raise InputError(
                f"{name} is a PEFT layer (a DoRA stage?); GPU engines serve plain LoRA only: export a "
                "model without PEFT layers, or serve the stage's PEFT folder with its engine directly"
            )


def describe(model: nn.Module) -> Layout:
    """The layout of ``model``'s adapters.

    Raises:
        InputError: PEFT layers (DoRA), or adapters injected with different configs.
    """
    _check_plain_modules(model)
    layers = adapter_layers(model)
    if not layers:
        return Layout(None, {}, [], 0, [])
    configs = {layer.config.model_dump_json() for layer in layers.values()}
    first = next(iter(layers.values()))
    if getattr(first.config, "layer_experts", None):
        raise InputError(
            "layer-wise expert counts (MoLA's layer_experts) have no GPU-engine export; "
            "evaluate or serve the stage with forgetless instead"
        )
    if len(configs) != 1 or not all(type(layer) is type(first) for layer in layers.values()):
        raise InputError(
            "the model's adapters were injected with different configs; export models with one adapter config"
        )
    config = first.config
    if first.single_delta:
        return Layout("lora", layers, [ExportedAdapter(SINGLE_NAME, None, config.r, True)], 0, [])
    if not first.routed:
        raise InputError(f"adapter kind {first.kind} has no GPU-engine export; use lora, moe_lora or slim")
    exact = config.num_experts == 1 and config.num_identity_experts == 0
    rank = config.num_experts * config.r
    sets = len(first.earlier_experts) + 1
    if sets == 1:
        adapters = [ExportedAdapter(SINGLE_NAME, None, rank, exact)]
    else:
        adapters = [ExportedAdapter(f"stage{index}", index, rank, exact) for index in range(sets)]
    gated = config.uses_sample_gate and first.gate_moments is not None
    gate_stages = len(first.earlier_gates) + 1 if gated else 0
    if sets > 1 and gate_stages != sets:
        raise InputError(
            f"the adapter holds {sets} expert sets but its gate {gate_stages} stages; save it again"
        )
    stage_adapters = [adapters[index if sets > 1 else 0].name for index in range(gate_stages)]
    return Layout(config.kind, layers, adapters, gate_stages, stage_adapters)
