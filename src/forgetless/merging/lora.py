"""LoRA outputs: truncated-SVD re-factorisation of a merged dense delta, and the PEFT adapter config.

For merged deltas ``D`` (``d_out x d_in``) the best rank-``k`` approximation in Frobenius norm is
``U_k S_k V_k^T`` (Eckart-Young). We split the singular values evenly, ``B = U_k S_k^(1/2)`` and
``A = S_k^(1/2) V_k^T``, so that neither factor dwarfs the other if the adapter is trained further,
and write the adapter with ``lora_alpha = r`` (scaling 1) so that ``B A`` is the delta itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Factorized:
    """``A`` (rank x d_in) and ``B`` (d_out x rank) with ``B A ~ D``; squared Frobenius norms for the error."""

    a: Tensor
    b: Tensor
    residual_sq: float
    norm_sq: float

    @property
    def relative_error(self) -> float:
        """``||D - B A||_F / ||D||_F`` (0 for a zero delta)."""
        return (self.residual_sq / self.norm_sq) ** 0.5 if self.norm_sq > 0 else 0.0


def svd_factorize(delta: Tensor, rank: int) -> Factorized:
    """Best rank-``rank`` factors of ``delta`` (``d_out x d_in``); padded with zeros when the matrix is smaller.

    Computed in float64 (the SVD of a 576 x 1536 matrix takes milliseconds) and returned as float32.
    """
    matrix = delta.double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    residual_sq = float((matrix - b @ a).pow(2).sum())
    norm_sq = float(matrix.pow(2).sum())
    if k < rank:  # a uniform rank keeps the adapter config simple; zero rows add nothing
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return Factorized(a.float(), b.float(), residual_sq, norm_sq)


def adapter_config(
    modules: list[str], rank: int, base_model: str | None, template: dict, fan_in_fan_out: bool = False
) -> dict:
    """A PEFT ``adapter_config.json`` for factors with scaling 1 on exactly ``modules``.

    ``target_modules`` lists full module names, which PEFT matches exactly, so an adapter that only
    touched some layers does not grow empty LoRA layers elsewhere.
    """
    return {
        "peft_type": "LORA",
        "task_type": template.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": base_model or template.get("base_model_name_or_path"),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def lora_keys(module: str) -> tuple[str, str]:
    """PEFT's saved names of a module's factors."""
    return f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"


__all__ = ["Factorized", "adapter_config", "lora_keys", "svd_factorize"]
