"""``AdapterConfig``: every knob of LoRA, MoE-LoRA and SLIM adapters in one validated model.

The three kinds are one family and differ only in their defaults (slim.py, the steps
of SLIM as we implement them), so a comparison between them changes one thing at a time:

=============  ======  ========  ==========  =======  ==========  =========
kind           LoRA    identity  top-K       router   yielding    masking
=============  ======  ========  ==========  =======  ==========  =========
``lora``       1       0         1           none     off         off
``moe_lora``   8       0         2           learned  off         off
``slim``       8       2         2           learned  gamma = 1   p = 0.4
=============  ======  ========  ==========  =======  ==========  =========

Fields left unset take their kind's default; the presets ``AdapterConfig.lora()``,
``.moe_lora()`` and ``.slim()`` are the readable way to build one.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from forgetless.errors import InputError

MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Per-kind defaults for the fields declared ``None`` below; the kind names themselves are the
# layer registry's (adapters/base.py), checked in ``_fill_kind_defaults``.
_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": dict(
        num_experts=1,
        num_identity_experts=0,
        top_k=1,
        yield_scale=0.0,
        yield_pooling="token",
        mask_ratio=0.0,
        l1_weight=0.0,
        balance_weight=0.0,
    ),
    "moe_lora": dict(
        num_experts=8,
        num_identity_experts=0,
        top_k=2,
        yield_scale=0.0,
        yield_pooling="token",
        mask_ratio=0.0,
        l1_weight=0.0,
        balance_weight=0.01,
    ),
    "slim": dict(
        num_experts=8,
        num_identity_experts=2,
        top_k=2,
        yield_scale=1.0,
        # the paper's Sec. 3.3 computes d "for each input sample": one decision per sequence
        yield_pooling="sample",
        # chosen on validation data in docs/results.md (protocol A): p = 0.4 scored best of
        # 0 / 0.2 / 0.4 / 0.6 / 0.8 by the pre-set rule; every p <= 0.6 was within noise
        mask_ratio=0.4,
        l1_weight=1e-3,
        balance_weight=0.01,
    ),
}


# SLIM's stage_experts where its gate allows per_task: chosen on validation data by the rule in
# benchmarks/stage_experts.py (docs/results.md, protocol C)
_SLIM_STAGE_EXPERTS = "per_task"


class AdapterConfig(BaseModel):
    """Adapter hyper-parameters. Unknown keys are errors; ``None`` fields take the kind's default."""

    model_config = ConfigDict(extra="forbid")

    #: filled when the adapter is built, from the tokenizer (``inject_adapters(..., tokenizer=)``)
    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = (
        "template_prefix_ids",
        "template_suffix_ids",
        "gate_earlier_tasks",
    )

    kind: str = Field("slim", description="adapter kind: lora, moe_lora or slim")
    r: int = Field(16, ge=1, description="rank of every LoRA expert")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; each expert's output is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input (training only)")
    target_modules: list[str] = Field(
        default_factory=lambda: list(MLP_PROJECTIONS),
        min_length=1,
        description="nn.Linear modules to adapt: a name suffix (gate_proj) or a regex matched against the "
        "full module name (model\\.layers\\.[0-3]\\..*_proj); default the MLP projections",
    )
    num_experts: int | None = Field(None, ge=1, description="number of LoRA experts E_l (slim: 8)")
    num_identity_experts: int | None = Field(
        None,
        ge=0,
        description="number of identity experts E_id, which add nothing to the base layer (slim: 2)",
    )
    layer_experts: list[int] | None = Field(
        None,
        min_length=1,
        description="MoLA's layer-wise allocation: the LoRA experts of each group of layers, lowest "
        "layers first (e.g. [2, 4, 6, 8]: the adapted layers split by depth into 4 equal groups); "
        "each adapted module takes its group's count as its num_experts; unset: num_experts everywhere",
    )
    top_k: int | None = Field(None, ge=1, description="experts active per token K (slim: 2)")
    top_p: float | None = Field(
        None,
        gt=0,
        le=1,
        description="dynamic routing (MixLoRA-Dy): a token takes experts in order of router probability "
        "until their cumulative probability reaches top_p, at most top_k of them; unset: always top_k",
    )
    router_init_std: float = Field(0.02, ge=0, description="std of the normal init of the router weights")
    router_input_norm: bool = Field(
        False, description="RMS-normalise a token before the router (logits independent of its scale)"
    )
    num_clusters: int = Field(4, ge=1, description="sliding-clustering centres N_c per adapted layer")
    cluster_momentum: float = Field(
        0.99, ge=0, lt=1, description="EMA momentum of the cluster centres, variances and distance reference"
    )
    distance_reduction: Literal["max", "quantile", "mean"] = Field(
        "max", description="reduction over channels of |x - mu| / sigma in the distance d(x)"
    )
    distance_quantile: float = Field(
        0.9, gt=0, lt=1, description="quantile over channels used when distance_reduction is quantile"
    )
    distance_calibration: Literal["ratio", "zscore", "none"] = Field(
        "ratio",
        description="per-layer calibration of d(x) before it shifts logits: ratio (d - d_ref) / d_ref, "
        "zscore (d - d_ref) / std_d with running in-domain statistics, or none (the paper's raw d)",
    )
    yield_scale: float | None = Field(
        None,
        ge=0,
        description="weight-yielding scale gamma added times the distance to identity logits (slim: 1)",
    )
    yield_pooling: Literal["token", "prompt", "sample"] | None = Field(
        None,
        description="what drives weight yielding: sample (slim's default; the paper's d 'for each input "
        "sample'): one value per sequence, the distance pooled over its prompt's content tokens in every "
        "adapted layer, z-scored and averaged over layers, applied to all its tokens; token: each token's "
        "own d(x); prompt: the causal running mean of d over the sequence's tokens so far",
    )
    yield_threshold: float = Field(
        3.0,
        description="sample pooling: a sequence whose gate score (in-domain z-score) reaches this value "
        "yields fully: it runs the base model's path with no expert work",
    )
    gate_statistics: Literal["per_task", "shared"] = Field(
        "per_task",
        description="sample pooling: per_task keeps the gate's clusters and moments of every training stage "
        "apart (frozen when the next stage starts) and scores a prompt by its distance to the nearest "
        "task; shared keeps one set that every stage updates",
    )
    stage_experts: Literal["per_task", "shared"] | None = Field(
        None,
        description="sample pooling with per_task gate statistics: per_task freezes a copy of the experts "
        "(and router) when the next stage starts and sends each prompt to the experts of its nearest "
        "stage, so later stages cannot overwrite what earlier ones learned (memory and disk grow by one "
        "expert set per stage); shared trains one set over every stage (slim: per_task where the gate "
        "allows it, else shared)",
    )
    gate_earlier_tasks: int = Field(
        0,
        ge=0,
        description="sample pooling, per_task: how many earlier stages' gate statistics the adapter holds "
        "(set by open_gate_task when a stage continues the adapter)",
    )
    template_prefix_ids: list[int] = Field(
        default_factory=list,
        description="sample pooling: the chat template's fixed leading tokens (system turn, user header), "
        "left out of the pooled distance; filled from the tokenizer (PromptFormatter.template_parts)",
    )
    template_suffix_ids: list[int] = Field(
        default_factory=list,
        description="sample pooling: the template's fixed closing tokens (end of turn, assistant header)",
    )
    yield_skip: int = Field(
        0,
        ge=0,
        description="prompt pooling: leading tokens of every sequence left out of the mean (the chat "
        "template's fixed prefix, the same for every prompt; PromptFormatter(tokenizer).template_prefix_length() gives it)",
    )
    mask_ratio: float | None = Field(
        None, ge=0, lt=1, description="dynamic-merging mask ratio p: dropped fraction of each B A (slim: 0.4)"
    )
    merge_scale: float = Field(1.0, gt=0, description="dynamic-merging scale lambda on the masked experts")
    mask_in_training: bool = Field(
        False,
        description="also mask experts during training (otherwise masking is applied at inference only)",
    )
    l1_weight: float | None = Field(
        None, ge=0, description="weight of the L1 penalty on A and B (slim: 1e-3)"
    )
    balance_weight: float | None = Field(
        None, ge=0, description="weight of the load-balancing loss over LoRA experts (moe_lora, slim: 0.01)"
    )
    balance_form: Literal["load", "localized"] = Field(
        "load",
        description="the balance loss: load (Switch / MixLoRA: expert use times router probability) or "
        "localized (LoRAMoE's localized balancing constraint over two halves of the experts, "
        "regularisers.py); needs an even num_experts",
    )
    balance_delta: float = Field(
        0.1, ge=0, lt=1, description="localized balance: the coefficient's spread delta (LoRAMoE: 0.1)"
    )
    train_experts: bool = Field(
        True, description="train the LoRA experts; false keeps them frozen and trains only the router"
    )
    seed: int = Field(0, description="seed of the adapter initialisation and of the masks")

    @model_validator(mode="before")
    @classmethod
    def _fill_kind_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        from forgetless.adapters.base import ADAPTER_LAYERS  # the registry names the kinds

        kind = data.get("kind", "slim")
        if kind not in ADAPTER_LAYERS:
            ADAPTER_LAYERS.get(kind)  # raises the did-you-mean error listing the valid kinds
        filled = dict(data)
        if filled.get("layer_experts") and filled.get("num_experts") is None:
            filled["num_experts"] = max(filled["layer_experts"])
        if kind not in _KIND_DEFAULTS:  # a kind registered by a developer without its defaults
            raise ValueError(
                f"adapter kind '{kind}' has no entry in _KIND_DEFAULTS (adapters/config.py); add one"
            )
        for key, value in _KIND_DEFAULTS[kind].items():
            if filled.get(key) is None:
                filled[key] = value
        if filled.get("stage_experts") is None:
            per_stage = (
                _SLIM_STAGE_EXPERTS == "per_task"
                and kind == "slim"
                and filled.get("yield_pooling") == "sample"
                and filled.get("gate_statistics", "per_task") == "per_task"
            )
            filled["stage_experts"] = "per_task" if per_stage else "shared"
        return filled

    @model_validator(mode="after")
    def _check_consistent(self) -> AdapterConfig:
        if self.kind == "lora":
            for key, plain in (("num_experts", 1), ("num_identity_experts", 0), ("top_k", 1)):
                if getattr(self, key) != plain:
                    raise ValueError(
                        f"{key}: kind lora has {key}={plain}; use kind moe_lora or slim for mixtures"
                    )
            if self.yield_scale or self.mask_ratio:
                raise ValueError("kind lora has no yielding or masking; use kind slim")
            if self.top_p is not None:
                raise ValueError("top_p: kind lora has no router; use kind moe_lora or slim")
        if self.yield_pooling == "prompt" and not self.num_identity_experts:
            raise ValueError("yield_pooling prompt needs identity experts to yield to; use kind slim")
        if self.stage_experts == "per_task" and not (
            self.uses_sample_gate and self.gate_statistics == "per_task"
        ):
            raise ValueError(
                "stage_experts per_task needs the sample-level gate with per-task statistics to pick a "
                "prompt's stage; set yield_pooling: sample and gate_statistics: per_task, or stage_experts: shared"
            )
        counts = self.layer_experts or [self.num_experts]
        if self.balance_form == "localized" and any(count < 2 or count % 2 for count in counts):
            raise ValueError(
                f"balance_form localized splits the LoRA experts in two halves; num_experts is "
                f"{', '.join(map(str, counts))}, use an even number of at least 2"
            )
        if self.balance_form == "localized" and self.uses_sample_gate:
            raise ValueError(
                "balance_form localized sums routing over whole sequences, which the sample-level gate "
                "splits; use balance_form load with yield_pooling sample"
            )
        self._check_layer_experts()
        total = self.num_experts + self.num_identity_experts
        if self.top_k > total:
            raise ValueError(f"top_k: {self.top_k} is more than the {total} experts; lower top_k")
        for pattern in self.target_modules:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"target_modules: '{pattern}' is not a valid regex ({error})") from error
        return self

    def _check_layer_experts(self) -> None:
        if not self.layer_experts:
            return
        if self.kind == "lora" or min(self.layer_experts) < 1:
            raise ValueError(
                "layer_experts: every group needs at least 1 expert of a mixture (kind moe_lora)"
            )
        if self.uses_sample_gate:
            raise ValueError(
                "layer_experts: the sample-level gate keeps one expert layout for every layer; "
                "unset layer_experts or use yield_pooling token"
            )
        fewest = min(self.layer_experts) + self.num_identity_experts
        if self.top_k > fewest:
            raise ValueError(f"top_k: {self.top_k} is more than the {fewest} experts of the smallest group")

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        """Validate ``data``; any problem becomes one ``InputError`` line naming ``source`` and the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            from forgetless.validation import explain

            raise InputError(explain(error, source, cls, hidden=())) from None

    @classmethod
    def lora(
        cls, r: int = 16, alpha: float = 32.0, target_modules: list[str] | None = None, **fields: Any
    ) -> AdapterConfig:
        """Plain LoRA (one expert, no router): the fast path, as fast as PEFT LoRA."""
        return cls._preset("lora", r, alpha, target_modules, fields)

    @classmethod
    def moe_lora(
        cls, r: int = 16, alpha: float = 32.0, target_modules: list[str] | None = None, **fields: Any
    ) -> AdapterConfig:
        """MixLoRA-style mixture of LoRA experts: no identity experts, no yielding, no masking."""
        return cls._preset("moe_lora", r, alpha, target_modules, fields)

    @classmethod
    def slim(
        cls, r: int = 16, alpha: float = 32.0, target_modules: list[str] | None = None, **fields: Any
    ) -> AdapterConfig:
        """SLIM: LoRA and identity experts, sliding-clustering yielding, dynamic merging, L1."""
        return cls._preset("slim", r, alpha, target_modules, fields)

    @classmethod
    def _preset(
        cls, kind: str, r: int, alpha: float, target_modules: list[str] | None, fields: dict[str, Any]
    ) -> AdapterConfig:
        data = dict(fields, kind=kind, r=r, alpha=alpha)
        if target_modules is not None:
            data["target_modules"] = list(target_modules)
        return cls.from_dict(data, source=f"AdapterConfig.{kind}")

    # ---- per module (MoLA) ---------------------------------------------------------------------

    def for_modules(self, names: list[str]) -> list[AdapterConfig]:
        """The config of each adapted module, in the order of ``names``: this one, or with
        ``layer_experts`` a copy whose ``num_experts`` is the module's group's count. Groups split
        the distinct layer numbers (the first number in a module's name; 0 without one) into
        ``len(layer_experts)`` equal runs, lowest first."""
        if not self.layer_experts:
            return [self] * len(names)
        depths = [_layer_number(name) for name in names]
        order = {depth: rank for rank, depth in enumerate(sorted(set(depths)))}
        groups = len(self.layer_experts)
        counts = [self.layer_experts[order[depth] * groups // len(order)] for depth in depths]
        copies = {count: self.model_copy(update={"num_experts": count}) for count in set(counts)}
        return [copies[count] for count in counts]

    def shared(self) -> AdapterConfig:
        """The one config every module of an adapter came from (``for_modules`` undone)."""
        if not self.layer_experts or self.num_experts == max(self.layer_experts):
            return self
        return self.model_copy(update={"num_experts": max(self.layer_experts)})

    # ---- derived -------------------------------------------------------------------------------

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor on every expert's ``B A x``."""
        return self.alpha / self.r

    @property
    def num_total_experts(self) -> int:
        """``E_l + E_id``: the router's number of logits."""
        return self.num_experts + self.num_identity_experts

    @property
    def uses_clustering(self) -> bool:
        """Sliding clustering matters when identity experts take a yielding shift, or when a
        sample-level gate switches whole sequences to the base model."""
        return (self.num_identity_experts > 0 and self.yield_scale > 0) or self.yield_pooling == "sample"

    @property
    def uses_sample_gate(self) -> bool:
        """One yielding decision per sequence, from a base-model pass over its prompt (gate.py):
        the hard switch at ``yield_threshold`` always, the soft shift ``gamma * score`` on
        identity experts where there are any. Without identity experts this is a plain
        out-of-distribution switch in front of the experts (the gate-only baseline)."""
        return self.yield_pooling == "sample"


def _layer_number(name: str) -> int:
    """The first number among a module name's parts (``model.layers.12.mlp.up_proj`` -> 12), else 0."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return 0
