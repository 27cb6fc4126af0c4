"""Plain LoRA: ``y = W x + b + s * B A dropout(x)``, ``s = alpha / r`` (Hu et al.; SLIM's mixture with E_l = K = 1).

The fast path of the adapter family: no router, no clustering, no masking, so one step costs what
PEFT's LoRA costs. Initialised as PEFT does (A Kaiming-uniform, B zero), so a fresh adapter leaves
the model unchanged and the same seed gives the same A.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from forgetless.adapters.base import ADAPTER_LAYERS, AdapterLayer, TokenContext
from forgetless.adapters.config import AdapterConfig


def pad_rank(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A (r, d_in) and B (d_out, r) padded with zeros to ``rank``: ``B A`` is unchanged."""
    missing = rank - a.shape[0]
    if missing == 0:
        return a, b
    return torch.cat([a, a.new_zeros(missing, a.shape[1])]), torch.cat(
        [b, b.new_zeros(b.shape[0], missing)], dim=1
    )


@ADAPTER_LAYERS.register("lora")
class LoRALinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus one low-rank update.

    Parameters:
        lora_A: (r, d_in), lora_B: (d_out, r); ``scaling`` = alpha / r.
    """

    kind = "lora"
    single_delta = True

    def __init__(
        self,
        base_layer: nn.Linear,
        config: AdapterConfig,
        context: TokenContext,
        generator: torch.Generator,
        layer_index: int = 0,
    ) -> None:
        super().__init__(base_layer, config, context)
        dtype, device = self.adapter_dtype(), base_layer.weight.device
        a = torch.empty(config.r, self.in_features, dtype=dtype)
        # kaiming_uniform_(a=sqrt(5)) as nn.Linear/PEFT: bound = 1 / sqrt(d_in), drawn from our generator
        bound = 1.0 / math.sqrt(self.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, dtype=dtype, device=device))
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B, float(self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        result = self.base_layer(x)
        h = self.dropout(x.to(self.lora_A.dtype))
        update = (h @ self.lora_A.T) @ self.lora_B.T
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> Tensor:
        """``s * B A`` (d_out x d_in): what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def l1_penalty(self) -> Tensor:
        r = self.config.r
        return self.lora_B.abs().sum() / (r * self.out_features) + self.lora_A.abs().sum() / (
            r * self.in_features
        )

    def load_factors(self, a: Tensor, b: Tensor, scaling: float) -> None:
        """Set A (r x d_in), B (d_out x r) and the scaling (used for PEFT folders with rsLoRA or other alpha)."""
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
        self.scaling = float(scaling)
