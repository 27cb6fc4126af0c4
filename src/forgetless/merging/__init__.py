"""Model merging: pure tensor merge methods (one file each) and a streaming merge over safetensors.

    from forgetless.merging import load_merge_config, run_merge
    summary = run_merge(load_merge_config("merge.yaml"), "merged/")

Methods (``MERGE_METHODS``): average, task_arithmetic, ties, dare, dare_ties, lora_average.
Inputs are full models (task vectors against ``base_model``) or PEFT LoRA adapters (merged on the
dense deltas ``s B A``); outputs are an HF model folder or a PEFT LoRA of rank ``out_rank``.
"""

from forgetless.merging.base import MERGE_METHODS, MergeMethod, merge_method
from forgetless.merging.config import MergeConfig, ModelEntry, load_merge_config, validate_merge_config
from forgetless.merging.run import merge_state_dicts, merge_tensor, run_merge

__all__ = [
    "MERGE_METHODS",
    "MergeConfig",
    "MergeMethod",
    "ModelEntry",
    "load_merge_config",
    "merge_method",
    "merge_state_dicts",
    "merge_tensor",
    "run_merge",
    "validate_merge_config",
]
