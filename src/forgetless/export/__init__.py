"""Exports for GPU engines: what vLLM, SGLang and TGI load today (a base model + PEFT LoRA adapters).

    forgetless export runs/x/methods/slim/stage-2-glorp_arithmetic --for vllm --out exports/slim

writes ``base/`` (Hugging Face folder), ``adapters/NAME/`` (PEFT LoRA: one for plain LoRA, one per
training stage for SLIM's per-stage experts), ``router.json`` + ``router.py`` (picks an adapter or
the base model per prompt, as SLIM's sample-level gate does; no forgetless needed) and
``export.json`` (what is exact, what is approximated, the measured gap). ``layout.py`` says what
a model exports as, ``experts.py`` how an expert mixture becomes one LoRA, ``calibration.py``
how its weights are measured, ``gap.py`` how the result is compared with forgetless's forward.
"""

from forgetless.export.experts import concatenate_experts
from forgetless.export.run import export_model, summary_lines
from forgetless.export.targets import EXPORT_TARGETS

__all__ = ["EXPORT_TARGETS", "concatenate_experts", "export_model", "summary_lines"]
