"""FFT-MoE: a standard Mixtral folder from a Llama-family base and fully fine-tuned experts.

The MoE keeps the base's embeddings, attention, norms and head; layer ``l``'s MLP becomes a
sparse MoE block whose expert ``e`` is expert model ``e``'s MLP of layer ``l`` (Mixtral, Jiang et
al., 2024; mixing as in Lee et al., 2024). Llama's SwiGLU MLP ``down(act(gate x) * up x)`` is
exactly a Mixtral expert ``w2(act(w1 x) * w3 x)``, so the weights are copied under the names the
Mixtral checkpoints on the hub use::

    model.layers.{l}.mlp.gate_proj.weight  ->  model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight
    model.layers.{l}.mlp.up_proj.weight    ->  model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight
    model.layers.{l}.mlp.down_proj.weight  ->  model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight
    (router rows)                          ->  model.layers.{l}.block_sparse_moe.gate.weight

Plain ``transformers`` loads the folder (``MixtralForCausalLM``, no remote code).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from forgetless.errors import InputError
from forgetless.merging.sources import FullModel
from forgetless.merging.streaming import ShardedWriter

LLAMA_FAMILY = ("llama", "mistral")
_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_MLP_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def check_llama_family(base: FullModel) -> None:
    """Mixtral has no attention or MLP biases and a SwiGLU MLP: only Llama / Mistral bases map onto it."""
    config = base.config
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise InputError(
            f"{base.spec}: FFT-MoE writes a Mixtral model and needs a Llama-family base ({', '.join(LLAMA_FAMILY)}); "
            f"got model_type {model_type}. Mix LoRA adapters instead (LoRA-MoE works for every architecture)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise InputError(
                f"{base.spec}: {flag} is true, but Mixtral layers have no biases; FFT-MoE cannot keep them"
            )
    layers = int(config["num_hidden_layers"])
    for layer in range(layers):
        for projection in _MLP:
            key = f"model.layers.{layer}.mlp.{projection}.weight"
            if key not in base.reader:
                raise InputError(
                    f"{base.spec}: tensor {key} is missing; the base is not a standard Llama checkpoint"
                )


def router_points(base: FullModel) -> dict[str, int]:
    """The MLP of every decoder layer routes tokens of width ``hidden_size``."""
    hidden = int(base.config["hidden_size"])
    return {f"model.layers.{layer}.mlp": hidden for layer in range(int(base.config["num_hidden_layers"]))}


def gate_name(point: str) -> str:
    return point.replace(".mlp", ".block_sparse_moe") + ".gate.weight"


def mixtral_config(base: FullModel, num_experts: int, top_k: int, dtype: torch.dtype | None) -> object:
    """A ``MixtralConfig`` with the base's dimensions, rope, ids and tying, plus the MoE settings."""
    from transformers import AutoConfig, MixtralConfig

    source = AutoConfig.from_pretrained(base.folder)
    fields = dict(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        initializer_range=source.initializer_range,
        rms_norm_eps=source.rms_norm_eps,
        pad_token_id=source.pad_token_id,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        tie_word_embeddings=source.tie_word_embeddings,
        sliding_window=getattr(source, "sliding_window", None),
        attention_dropout=getattr(source, "attention_dropout", 0.0),
        rope_parameters=getattr(source, "rope_parameters", None),
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        output_router_logits=False,
    )
    config = MixtralConfig(**fields)
    config.architectures = ["MixtralForCausalLM"]
    stored = base.reader.dtype("model.layers.0.mlp.gate_proj.weight")
    config.dtype = str(dtype or stored).removeprefix("torch.")
    return config


def plan(
    base: FullModel, num_experts: int, dtype: torch.dtype | None
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Every output tensor: the base's non-MLP tensors, then per layer the gate and the expert MLPs."""
    reader = base.reader

    def out(source_dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and source_dtype.is_floating_point else source_dtype

    entries = [
        (name, out(reader.dtype(name)), reader.shape(name))
        for name in reader.keys()
        if not _MLP_KEY.match(name)
    ]
    hidden = int(base.config["hidden_size"])
    gate_dtype = out(reader.dtype("model.layers.0.mlp.gate_proj.weight"))
    for layer in range(int(base.config["num_hidden_layers"])):
        entries.append((gate_name(f"model.layers.{layer}.mlp"), gate_dtype, (num_experts, hidden)))
        for expert in range(num_experts):
            for projection, short in _MLP.items():
                source = f"model.layers.{layer}.mlp.{projection}.weight"
                target = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{short}.weight"
                entries.append((target, out(reader.dtype(source)), reader.shape(source)))
    return entries


def write_tensors(
    writer: ShardedWriter, base: FullModel, experts: list[FullModel], gates: dict[str, Tensor]
) -> int:
    """Stream every planned tensor into ``writer`` (one tensor in memory at a time); returns the count."""
    written = 0
    for name in base.reader.keys():
        if not _MLP_KEY.match(name):
            writer.write(name, base.reader.read(name))
            written += 1
    for point, rows in gates.items():
        writer.write(gate_name(point), rows)
        written += 1
    for layer in range(int(base.config["num_hidden_layers"])):
        for index, expert in enumerate(experts):
            for projection, short in _MLP.items():
                tensor = expert.reader.read(f"model.layers.{layer}.mlp.{projection}.weight")
                writer.write(f"model.layers.{layer}.block_sparse_moe.experts.{index}.{short}.weight", tensor)
                written += 1
    return written


def gate_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Router point -> the loaded Mixtral's gate weight (transformers 5 calls the block ``mlp``)."""
    params = {}
    for name, module in model.named_modules():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate", name)
        if match and hasattr(module, "weight"):
            params[f"model.layers.{match[1]}.mlp"] = module.weight
    return params


def load_mixtral(folder: Path) -> tuple[torch.nn.Module, object]:
    """The written folder as a float32 model and its tokenizer (for router training)."""
    from forgetless.models import load_model

    return load_model(str(folder), dtype=torch.float32)


__all__ = [
    "LLAMA_FAMILY",
    "check_llama_family",
    "gate_name",
    "gate_parameters",
    "load_mixtral",
    "mixtral_config",
    "plan",
    "router_points",
    "write_tensors",
]
