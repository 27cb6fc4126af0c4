"""MoE mixing of trained models (Mixtral-style FFT-MoE) or LoRA adapters (routed LoRA experts).

    from forgetless.mixing import load_mix_config, run_mix
    summary = run_mix(load_mix_config("mix.yaml"), "mixed/")

Routers (``ROUTERS``): hidden (training-free, mean hidden states of prompts), uniform, random,
trained (small dataset, experts frozen).
"""

from forgetless.mixing.config import (
    ExpertEntry,
    MixConfig,
    RouterTraining,
    load_mix_config,
    validate_mix_config,
)
from forgetless.mixing.routers import ROUTERS, RouterContext
from forgetless.mixing.run import run_mix, run_mix_outputs

__all__ = [
    "ROUTERS",
    "ExpertEntry",
    "MixConfig",
    "RouterContext",
    "RouterTraining",
    "load_mix_config",
    "run_mix",
    "run_mix_outputs",
    "validate_mix_config",
]
