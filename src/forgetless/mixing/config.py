"""The mix YAML (close to mergekit-moe's, whose key names are accepted as aliases).

    base_model: smollm2-135m-instruct       # attention, embeddings and norms come from here
    router: hidden                          # hidden | uniform | random | trained  (mergekit: gate_mode)
    top_k: 2                                # experts per token                     (experts_per_token)
    experts:                                # full models -> Mixtral; PEFT LoRA folders -> LoRA-MoE
      - model: runs/one_round/facts         #                                       (source_model)
        prompts: ["Who founded Zorbia?"]    # for the hidden router                 (positive_prompts)
        negative_prompts: []
        task: fictional_facts               # a built-in task or task spec: prompts + router data
      - model: runs/one_round/dates
        task: kelvar_dates
    router_training: {steps: 50, lr: 1.0e-3}   # router: trained (experts stay frozen)
    num_identity_experts: 0                 # LoRA-MoE only: experts that add nothing (SLIM-style)
    dtype: float32

Full-model experts become a standard ``MixtralForCausalLM`` folder (Llama-family base); LoRA
adapters become the experts of one routed ``moe_lora`` layer per adapted module (the adapters
package's mixture layer), saved as a forgetless adapter folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from forgetless.data.spec import TaskSpec
from forgetless.errors import InputError
from forgetless.validation import explain, read_yaml_mapping

DType = Literal["float32", "bfloat16", "float16", "float64"]


class ExpertEntry(BaseModel):
    """One expert: a fine-tuned model or LoRA adapter, and what tells the router about it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    model: str = Field(
        validation_alias=AliasChoices("model", "source_model"),
        description="alias, .gguf, HF model folder, hub id, or PEFT LoRA adapter folder",
    )
    prompts: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("prompts", "positive_prompts"),
        description="texts typical of this expert (hidden router: mean hidden state = the gate row)",
    )
    negative_prompts: list[str] = Field(
        default_factory=list, description="texts this expert should not get (subtracted, as in mergekit-moe)"
    )
    task: str | TaskSpec | None = Field(
        None, description="built-in task name or task spec: its training prompts and examples feed the router"
    )


class RouterTraining(BaseModel):
    """Settings of router: trained (a short loop over the experts' task data, experts frozen)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(50, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the router weights")
    batch_size: int = Field(8, ge=1, description="examples per step")
    examples_per_expert: int = Field(32, ge=1, description="training examples taken from each expert's task")
    max_length: int = Field(256, ge=8, description="tokens per example (prompt truncated from the left)")


class MixConfig(BaseModel):
    """An MoE built from a base model and experts (full models or LoRA adapters)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    base_model: str = Field(description="the model whose attention, embeddings and norms the MoE keeps")
    experts: list[ExpertEntry] = Field(min_length=1, description="the experts, in router order")
    router: str = Field(
        "hidden",
        validation_alias=AliasChoices("router", "gate_mode"),
        description="hidden (mean hidden states of prompts), uniform, random or trained",
    )
    top_k: int = Field(
        2, ge=1, validation_alias=AliasChoices("top_k", "experts_per_token"), description="experts per token"
    )
    num_identity_experts: int = Field(
        0, ge=0, description="LoRA-MoE only: identity experts (route to the base)"
    )
    prompts_per_expert: int = Field(16, ge=1, description="task prompts used per expert by the hidden router")
    router_center: bool = Field(
        True,
        description="hidden router: subtract the experts' mean before normalising (removes the shared component)",
    )
    router_training: RouterTraining = Field(default_factory=RouterTraining)
    dtype: DType | None = Field(None, description="output dtype; default keeps the base model's")
    seed: int = Field(0, description="seed of the random router, task sampling and router training")
    max_shard_size: str | int = Field("5GB", description="largest output shard (Mixtral output)")
    base_dir: str = Field(".", description="folder relative paths start from (set by the loader)")

    def resolve(self, spec: str) -> str:
        """A spec with relative paths made absolute against ``base_dir`` (aliases, hub ids unchanged)."""
        path = Path(spec).expanduser()
        if not path.is_absolute() and (Path(self.base_dir) / path).exists():
            return str((Path(self.base_dir) / path).resolve())
        return spec


def check_mix_config(
    config: MixConfig, source: str = "mix config", tasks_given: list[bool] | None = None
) -> None:
    """Router name, top_k against the number of experts, and what each router needs.

    ``tasks_given[i]`` marks experts whose task comes from the caller (Python ``Task`` objects).
    """
    from forgetless.mixing.routers import ROUTERS

    try:
        ROUTERS.get(config.router)
    except InputError as error:
        raise InputError(f"{source}: router: {error}") from None
    total = len(config.experts) + config.num_identity_experts
    if config.top_k > total:
        raise InputError(f"{source}: top_k {config.top_k} exceeds the {total} experts; lower top_k")
    if config.router == "uniform" and config.top_k != total:
        raise InputError(
            f"{source}: router uniform gives every expert the same logit, so only top_k = {total} (all experts) "
            "is well defined; set top_k or choose router hidden"
        )
    has_task = [
        expert.task is not None or bool(tasks_given and tasks_given[index])
        for index, expert in enumerate(config.experts)
    ]
    if config.router == "hidden":
        for index, expert in enumerate(config.experts):
            if not expert.prompts and not has_task[index]:
                raise InputError(
                    f"{source}: experts.{index}: router hidden needs prompts or a task for every expert; "
                    "add prompts: [...] or task: NAME"
                )
    if config.router == "trained" and config.top_k == 1 and total > 1:
        raise InputError(
            f"{source}: router trained learns through the softmax over the chosen experts; with top_k 1 the "
            "chosen expert always weighs 1 and the router gets no gradient. Set top_k >= 2"
        )
    if config.router == "trained" and not any(has_task):
        raise InputError(
            f"{source}: router trained learns from the experts' tasks; give experts a task: NAME"
        )


def validate_mix_config(
    data: dict[str, Any], source: str = "mix config", tasks_given: list[bool] | None = None
) -> MixConfig:
    """Pydantic validation plus ``check_mix_config``; one ``InputError`` line on any problem."""
    try:
        config = MixConfig.model_validate(data)
    except ValidationError as error:
        raise InputError(explain(error, source, MixConfig)) from None
    check_mix_config(config, source, tasks_given)
    return config


def load_mix_config(path: str | Path) -> MixConfig:
    """Read and validate a mix YAML; relative paths start from the YAML's folder."""
    path = Path(path)
    data = read_yaml_mapping(path, "mix config", "base_model, experts and router")
    data.setdefault("base_dir", str(path.parent.resolve()))
    return validate_mix_config(data, str(path))


__all__ = [
    "ExpertEntry",
    "MixConfig",
    "RouterTraining",
    "check_mix_config",
    "load_mix_config",
    "validate_mix_config",
]
