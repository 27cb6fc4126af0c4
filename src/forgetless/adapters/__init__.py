"""Adapters (nn.Modules only): plain LoRA, MixLoRA-style MoE-LoRA and SLIM, one config, one injector.

from forgetless.adapters import AdapterConfig, inject_adapters, save_adapter
names = inject_adapters(model, AdapterConfig.slim(r=16))     # wraps gate/up/down, freezes the base
loss = lm_loss + adapter_regularization(model)                # L1 + load balancing
save_adapter(model, "out/adapter", base_model="smollm2-135m-instruct")
"""

from forgetless.adapters.base import ADAPTER_LAYERS, AdapterLayer
from forgetless.adapters.clustering import SlidingClusters
from forgetless.adapters.config import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, AdapterConfig
from forgetless.adapters.diagnostics import routing_diagnostics, separation_auc
from forgetless.adapters.gate import fitted_gate, open_gate_task
from forgetless.adapters.inject import (
    INFERENCE_FIELDS,
    adapter_layers,
    adapter_regularization,
    adapter_state_dict,
    find_target_modules,
    inject_adapters,
    lora_factors,
    merge_adapters,
    remove_adapters,
    set_inference_options,
    trainable_parameters,
)
from forgetless.adapters.lora import LoRALinear
from forgetless.adapters.masking import structured_dare_masks
from forgetless.adapters.moe import build_lora_moe
from forgetless.adapters.persist import export_peft_lora, load_adapter, save_adapter
from forgetless.adapters.pooling import PromptPool, reorder_sequence_state, uses_sequence_state
from forgetless.adapters.slim import MixtureLinear

__all__ = [
    "ADAPTER_LAYERS",
    "ATTENTION_PROJECTIONS",
    "INFERENCE_FIELDS",
    "MLP_PROJECTIONS",
    "AdapterConfig",
    "AdapterLayer",
    "LoRALinear",
    "MixtureLinear",
    "PromptPool",
    "SlidingClusters",
    "adapter_layers",
    "adapter_regularization",
    "adapter_state_dict",
    "build_lora_moe",
    "export_peft_lora",
    "find_target_modules",
    "fitted_gate",
    "inject_adapters",
    "load_adapter",
    "lora_factors",
    "merge_adapters",
    "open_gate_task",
    "remove_adapters",
    "reorder_sequence_state",
    "routing_diagnostics",
    "save_adapter",
    "separation_auc",
    "set_inference_options",
    "structured_dare_masks",
    "trainable_parameters",
    "uses_sequence_state",
]
