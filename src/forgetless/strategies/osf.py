"""OSF: Orthogonal Subspace Fine-tuning (Nayak et al. 2025) through PEFT's ``OSFConfig``.

"Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning"
(arXiv 2504.07097). Each target weight W is split by SVD into a frozen high-rank part
``U_high S_high V_high`` (its top-k singular directions, taken to be what earlier tasks use) and a
trainable remainder ``U_low S_low V_low``; gradient hooks project the gradients of ``U_low`` and
``V_low`` away from ``U_high`` / ``V_high``. AdamW's per-element step scaling lets part of the
update back out of that projection (tiny-llama, 3 steps: ~0.6% of a target's update in its frozen
``U_k x V_k`` block and 12-19% in its frozen output or input directions alone, against ~55% under
full fine-tuning), so after every optimizer step we also project the factors' values
(``keep_in_complement``, the ``after_step`` hook): the frozen directions then get nothing. Every
other weight stays frozen.

Continual recipe (PEFT's OSF docs, "Sequential Task Learning"): stage t re-wraps the model left by
stage t-1 with a fresh ``OSFConfig``, so the SVD is recomputed on the updated weights, and the
preserved rank grows each stage. The growth follows PEFT's continual example
(``examples/orthogonal_subspace_learning/osf_continual_learning.py``: ScienceQA -> NumGLUE -> FOMC
with ``effective_rank`` 0.3, 0.5, 0.7, a fraction of each weight's smaller dimension): stage t
preserves ``min(preserved_fraction + t * fraction_step, max_fraction)``. The cap (0.9, ours) keeps
a tenth of every spectrum trainable on long sequences, like the docs' ``(n-1)/n`` budget for 10 tasks.

What is saved: PEFT 0.21's OSF layer leaves the base weight untouched and adds the low-rank delta
in its forward, so the documented ``model.unload()`` would drop the training; we
``merge_and_unload()`` instead and save the full Hugging Face model folder (``artifact = "model"``,
as full fine-tuning does), plus ``forgetless_osf.json`` with each target's preserved rank. PEFT's
own OSF adapter would not be smaller: it stores the trainable factors and their initial copies
(about twice each target weight) and needs the previous stage's full weights to be applied.

Cost: one SVD per target weight per stage (O(m n min(m, n))). While training, each target holds
its weight plus the trainable factors and their frozen initial copies (2(1-f)(1 + min/max) times
the weight at preserved fraction f: ~2-3x at stage 0, less later) plus, for a non-square factor,
the frozen high-rank basis; AdamW keeps two moments of the factors. A stage's artifact is a full
model. Default learning rate 5e-6, the continual example's ``--learning_rate`` default.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from forgetless.adapters import MLP_PROJECTIONS
from forgetless.errors import InputError
from forgetless.io import atomic_dir, write_json
from forgetless.models.load import quiet_transformers
from forgetless.strategies import Strategy, StrategyParams, register_strategy
from forgetless.strategies._engines import Engine, ModelSource

if TYPE_CHECKING:
    from peft import OSFConfig

#: written next to the model weights: the stage's preserved fraction and per-module ranks
RANKS_FILE = "forgetless_osf.json"


class OSFParams(StrategyParams):
    target_modules: list[str] = Field(
        default_factory=lambda: list(MLP_PROJECTIONS),
        min_length=1,
        description="module names to train with OSF",
    )
    preserved_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="fraction of each weight's min(shape) singular directions frozen at stage 0",
    )
    fraction_step: float = Field(
        0.2, ge=0, lt=1, description="added to the preserved fraction at each later stage"
    )
    max_fraction: float = Field(
        0.9, gt=0, lt=1, description="cap on the preserved fraction (some rank always trains)"
    )

    @field_validator("max_fraction")
    @classmethod
    def _cap_above_start(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("preserved_fraction")
        if start is not None and value < start:
            raise ValueError(f"must be at least preserved_fraction ({start})")
        return value


class OSFEngine(Engine):
    """PEFT OSF, continued stage after stage; a stage saves the merged full model.

    As with ``DoraEngine``, the model we train and return is PEFT's underlying Hugging Face model
    with OSF layers injected (not the ``PeftModel`` wrapper); ``save`` merges it in place.

    Args:
        target_modules: module names OSF wraps.
        start, step, cap: preserved fraction at stage 0, its growth per stage, and its cap.
    """

    artifact = "model"
    default_lr = 5e-6  # PEFT's OSF continual example, --learning_rate default

    def __init__(self, target_modules: list[str], start: float, step: float, cap: float) -> None:
        super().__init__("continue")
        self.target_modules = list(target_modules)
        self.start, self.step, self.cap = start, step, cap
        self._peft_models: dict[int, Any] = {}
        self.peft_config(0)  # fail before compute

    def preserved_fraction(self, stage: int) -> float:
        return float(min(self.start + stage * self.step, self.cap))

    def peft_config(self, stage: int) -> OSFConfig:
        from peft import OSFConfig

        # a float in (0, 1] is a fraction of each target's min(weight.shape) (OSFConfig docstring)
        return OSFConfig(
            task_type="CAUSAL_LM",
            target_modules=list(self.target_modules),
            effective_rank=self.preserved_fraction(stage),
        )

    def build(self, stage: int, source: ModelSource, previous: list[Path], seed: int) -> nn.Module:
        from peft import get_peft_model

        base = source.load_folder(previous[-1]) if previous else source.fresh()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # OSF's default init is the SVD itself; seeded in case PEFT draws
                peft_model = get_peft_model(base, self.peft_config(stage))
        except ValueError as error:  # no such target, or a preserved rank that rounds to 0
            first = str(error).splitlines()[0].rstrip(".")
            raise InputError(
                f"strategy 'osf': {first}. Check target_modules, and that preserved_fraction times each "
                "target's smaller dimension is at least 1"
            ) from None
        model = peft_model.get_base_model()
        self._peft_models[id(model)] = peft_model
        return model

    def save(self, model: nn.Module, folder: Path, source: ModelSource) -> None:
        peft_model = self._peft_models.pop(id(model), None)
        if peft_model is None:
            raise RuntimeError("OSFEngine.save: the model was not built by this engine")
        ranks = preserved_ranks(model)
        merged = peft_model.merge_and_unload()  # in place: the same module tree, plain Linear layers
        quiet_transformers()
        with atomic_dir(folder, overwrite=True) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            source.tokenizer.save_pretrained(tmp)
            fraction = peft_model.peft_config["default"].effective_rank
            write_json(
                tmp / RANKS_FILE, {"peft": "osf", "preserved_fraction": fraction, "preserved_rank": ranks}
            )

    def load(self, stage: int, source: ModelSource, artifacts: list[Path]) -> nn.Module:
        return source.load_folder(artifacts[stage])


@torch.no_grad()
def keep_in_complement(model: nn.Module) -> None:
    """Put every OSF layer's trainable ``U_low`` / ``V_low`` back into the complement of its frozen
    subspace: the projection PEFT's gradient hooks apply to gradients, applied to the values.

    PEFT projects the *gradient*; AdamW then rescales each element of the step by its own second
    moment, which lets part of the update back into the frozen directions. Projecting the values
    after every optimizer step makes the protection exact. The bases are PEFT's own buffers
    (``OSFLayer.other_param_names``): ``_osf_U_high`` / ``_osf_V_high`` where the factor is not
    square, else the complement is spanned by ``_osf_U_low_init`` / ``_osf_V_low_init``.
    """
    from peft.tuners.osf.layer import OSFLayer

    for module in model.modules():
        if not isinstance(module, OSFLayer):
            continue
        for adapter, factors in module.osf_svd_params.items():
            u, v = factors["U_low"], factors["V_low"]
            if adapter in module._osf_U_high:
                high = module._osf_U_high[adapter]
                u.sub_(high @ (high.T @ u))
            else:
                low = module._osf_U_low_init[adapter]
                u.copy_(low @ (low.T @ u))
            if adapter in module._osf_V_high:
                high = module._osf_V_high[adapter]
                v.sub_((v @ high.T) @ high)
            else:
                low = module._osf_V_low_init[adapter]
                v.copy_((v @ low.T) @ low)


def preserved_ranks(model: nn.Module) -> dict[str, int]:
    """Module name -> preserved (frozen) rank of every OSF layer of ``model``."""
    from peft.tuners.osf.layer import OSFLayer

    return {
        name: int(next(iter(module.effective_rank.values())))
        for name, module in model.named_modules()
        if isinstance(module, OSFLayer) and module.effective_rank
    }


@register_strategy("osf")
class OSF(Strategy):
    """PEFT OSF, sequential: the frozen singular subspace grows stage after stage."""

    Params = OSFParams

    def after_step(self, model: nn.Module, step: int) -> None:
        keep_in_complement(model)  # exact protection despite AdamW's per-element scaling

    def make_engine(self) -> Engine:
        params = self.params
        return OSFEngine(
            params.target_modules, params.preserved_fraction, params.fraction_step, params.max_fraction
        )
