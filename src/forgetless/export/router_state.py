"""``router.json``: what the exported router (router.py) needs to decide as forgetless's gate does.

For every adapted module (model order) and every gate stage (the earlier stages' frozen
statistics first, the current stage's last, as ``MixtureLinear._measure_prompt`` orders them):
the sliding clusters' centres and floored inverse variances (``ClusterConstants.inverse``: the
variance floor already applied, so the router needs no copy of that rule), the calibration's
affine map of the raw distance, and the moments of the training prompts' pooled distance. Floats
are written as Python's ``repr`` of the float32 values, which reads back to the same float32.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from forgetless.export.layout import Layout
from forgetless.export.router import FORMAT, VERSION


def _stage_entry(clusters: nn.Module, moments: nn.Module) -> dict:
    constants = clusters.constants()
    return {
        "centres": clusters.centres.detach().float().cpu().tolist(),
        "inverse_variances": constants.inverse.detach().float().cpu().tolist(),
        "calibration_scale": float(constants.calibration_scale),
        "calibration_offset": float(constants.calibration_offset),
        "moments": {
            "mean": float(moments.sequence_mean),
            "square": float(moments.sequence_square),
            "batches": int(moments.batches),
        },
    }


def router_state(layout: Layout, serve_command: str) -> dict:
    """The content of ``router.json`` for ``layout`` (the model in eval mode)."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "base": "base",
        "adapters": [adapter.name for adapter in layout.adapters],
        "gated": layout.gated,
        "serve_command": serve_command,
    }
    if not layout.gated:
        return state
    first = next(iter(layout.layers.values()))
    config = first.config
    modules = []
    for name, layer in layout.layers.items():
        stages = [(gate.clusters, gate.moments) for gate in layer.earlier_gates]
        stages.append((layer.clusters, layer.gate_moments))
        modules.append({"module": name, "stages": [_stage_entry(*stage) for stage in stages]})
    state["gate"] = {
        "yield_threshold": config.yield_threshold,
        "stage_adapters": list(layout.stage_adapters),
        "template_prefix_ids": list(config.template_prefix_ids),
        "template_suffix_ids": list(config.template_suffix_ids),
        "reduction": config.distance_reduction,
        "quantile": config.distance_quantile,
        "modules": modules,
    }
    return state


def serve_command(adapters: Sequence[tuple[str, int]]) -> str:
    """The vLLM command that serves the export folder (run inside it): ``(name, rank)`` pairs."""
    command = "vllm serve base --served-model-name base"
    if not adapters:
        return command
    modules = " ".join(f"{name}=adapters/{name}" for name, _ in adapters)
    return f"{command} --enable-lora --lora-modules {modules} --max-lora-rank {max_lora_rank(adapters)}"


def max_lora_rank(adapters: Sequence[tuple[str, int]]) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds every adapter's rank."""
    largest = max((rank for _, rank in adapters), default=0)
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if largest <= allowed:
            return allowed
    return largest
