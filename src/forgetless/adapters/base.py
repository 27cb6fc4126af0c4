"""What every adapter layer shares: the kind registry, the wrapped base layer, the token mask.

A layer registers its class under the adapter kinds it implements (``@ADAPTER_LAYERS.register``
in ``lora.py`` and ``slim.py``); ``inject_adapters`` looks the class up by ``AdapterConfig.kind``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from forgetless.adapters.config import AdapterConfig
from forgetless.registry import Registry

ADAPTER_LAYERS: Registry[type[AdapterLayer]] = Registry("adapter kind", package="forgetless.adapters")


@dataclass
class TokenContext:
    """Per-forward information shared by all adapter layers of one model.

    ``attention_mask`` (batch x seq, 1 = real token) is captured by a forward pre-hook on the model
    (inject.py) so that padding tokens neither move cluster centres nor count in routing
    statistics; layers ignore it when its shape does not match their input (e.g. generation with
    a KV cache, where the mask covers past tokens too).
    """

    attention_mask: Tensor | None = None
    #: (batch, seq) token ids of the forward (the pre-hook captures them; None for embeddings)
    input_ids: Tensor | None = None
    #: (batch, seq) bool, True on prompt tokens, set by ``prompt_boundary`` when a forward holds
    #: prompts and answers; None means every real token of a sequence's first forward is prompt
    prompt_mask: Tensor | None = None
    #: the sample-level gate (gate.py) when the model's adapters use ``yield_pooling: sample``
    gate: Any = None
    #: state of the gate's base-model pass: True while it runs, the (batch, seq) content mask it
    #: pools over, and each adapted layer's z-scored pooled distance (batch,)
    gate_pass: bool = False
    content_mask: Tensor | None = None
    gate_scores: list[Tensor] = field(default_factory=list)
    #: True while a training loop runs whose prompts the gate already measured (``fitted_gate``):
    #: training forwards then skip the gate's base pass
    gate_fitted: bool = False

    def token_mask(self, leading_shape: torch.Size) -> Tensor | None:
        """Flat bool mask (tokens,) for an input of shape ``(*leading_shape, d_in)``, or None."""
        mask = self.attention_mask
        if mask is None or tuple(mask.shape) != tuple(leading_shape):
            return None
        return mask.reshape(-1).bool()


class AdapterLayer(nn.Module):
    """Base of the adapter layers: wraps a frozen ``nn.Linear`` as ``base_layer``.

    Subclasses add their parameters and implement ``forward``, ``l1_penalty`` and, where
    they route, ``balance_loss``. ``adapter_state`` holds every tensor that is saved (parameters
    and buffers outside ``base_layer``).

    What a kind can do is declared here, on its class, and read by the code that depends on it
    (merging, PEFT files, GPU export, inference options, diagnostics, the loss's prefix sharing),
    never found out by a class or kind-name check:

    - ``single_delta``: the update is one low-rank product ``scaling * B @ A`` (``low_rank_factors``):
      it merges into the weight, reads and writes as one PEFT LoRA, exports as itself;
    - ``routed``: tokens are routed among experts; such layers take inference options
      (``set_inference_options``), have routing diagnostics and keep per-forward statistics.
    """

    kind: str = ""
    single_delta: bool = False
    routed: bool = False

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, context: TokenContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        # A plain attribute, not a submodule: the context is shared and holds no parameters.
        self.context = context
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    @property
    def weight(self) -> Tensor:
        """The frozen base weight (d_out x d_in); code that reads ``module.weight`` keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def adapter_dtype(self) -> torch.dtype:
        """Adapters train in float32 on half-precision bases (as PEFT does): tiny updates survive."""
        dtype = self.base_layer.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def adapter_state(self) -> dict[str, Tensor]:
        """Every saved tensor of this layer, keyed by its name inside the layer (no ``base_layer.*``)."""
        state = {}
        for key, tensor in self.state_dict(keep_vars=False).items():
            if not key.startswith("base_layer."):
                state[key] = tensor.detach()
        return state

    def l1_penalty(self) -> Tensor:
        """``sum_e |B_e|_1 / (r d_out) + |A_e|_1 / (r d_in)`` (Eq. 7, unweighted), a scalar tensor."""
        raise NotImplementedError  # each layer defines it; AdapterLayer itself is never instantiated

    def after_load(self) -> None:
        """Called after saved tensors were copied in (layers drop caches derived from them)."""

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        """``(A (r, d_in), B (d_out, r), scaling)`` of a ``single_delta`` layer."""
        raise NotImplementedError(f"adapter kind {self.kind} is not one low-rank update")

    def balance_loss(self) -> Tensor | None:
        """The load-balancing loss of the last training forward, or None when the layer does not route."""
        return None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}, r={self.config.r}"
