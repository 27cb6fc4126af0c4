"""The merge YAML, close to mergekit's, validated by pydantic before anything is read or written.

    merge_method: ties
    base_model: smollm2-135m-instruct
    models:
      - model: runs/one_round/task1            # HF folder, alias, .gguf, hub id, or PEFT LoRA folder
        parameters: {weight: 1.0, density: 0.2}
      - model: runs/one_round/task2
        parameters: {weight: 0.5}
    parameters: {lambda: 1.0, density: 0.2}    # shared ones, and defaults for per-model ones
    dtype: bfloat16                            # output dtype (default: the inputs')
    output: model                              # or lora: a PEFT adapter of rank out_rank (SVD)
    out_rank: 16

A ``models`` entry equal to ``base_model`` is skipped for methods that measure task vectors from
the base (mergekit configs often list it). Relative paths start from the YAML file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forgetless.errors import InputError
from forgetless.merging.base import MERGE_METHODS, MergeMethod
from forgetless.registry import did_you_mean
from forgetless.validation import explain, read_yaml_mapping

DType = Literal["float32", "bfloat16", "float16", "float64"]


class ModelEntry(BaseModel):
    """One input model or LoRA adapter and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="alias, .gguf file, HF model folder, PEFT LoRA adapter folder, or hub id")
    parameters: dict[str, float] = Field(
        default_factory=dict, description="per-model parameters of the merge method (weight, density)"
    )


class MergeConfig(BaseModel):
    """A merge: method, base, inputs with their parameters, and what to write."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str = Field(description="average, task_arithmetic, ties, dare, dare_ties or lora_average")
    base_model: str | None = Field(
        None,
        description="the model task vectors are measured from (needed by all but average / lora_average)",
    )
    models: list[ModelEntry] = Field(min_length=1, description="the models or LoRA adapters to merge")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="shared parameters (lambda, normalize, rescale) and per-model defaults",
    )
    dtype: DType | None = Field(None, description="output dtype; default keeps each input tensor's dtype")
    output: Literal["model", "lora"] = Field(
        "model", description="model: a full HF model folder; lora: a PEFT LoRA folder (LoRA inputs only)"
    )
    out_rank: int | None = Field(
        None, ge=1, description="rank of the LoRA written by output: lora (truncated SVD)"
    )
    seed: int = Field(0, description="seed of the random drop (dare, dare_ties)")
    max_shard_size: str | int = Field("5GB", description="largest output shard, e.g. 2GB or 500MB")
    base_dir: str = Field(".", description="folder relative model paths start from (set by the loader)")

    @property
    def method(self) -> MergeMethod:
        return MERGE_METHODS.get(self.merge_method)

    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else getattr(torch, self.dtype)

    def input_entries(self) -> list[ModelEntry]:
        """The entries actually merged (the base model skipped where it is the reference)."""
        if self.method.needs_base and self.base_model is not None:
            return [entry for entry in self.models if entry.model != self.base_model]
        return list(self.models)

    def per_model_values(self) -> dict[str, list[float]]:
        """Per-model parameter name -> one value per merged entry (entry, then shared default, then method)."""
        method = self.method
        values: dict[str, list[float]] = {}
        for name, default in method.per_model.items():
            fallback = float(self.parameters.get(name, default))
            values[name] = [float(entry.parameters.get(name, fallback)) for entry in self.input_entries()]
        return values

    def shared_values(self) -> dict[str, Any]:
        """Shared parameter Python name -> value (method defaults filled in)."""
        method = self.method
        return {
            method.python_name(name): self.parameters.get(name, default)
            for name, default in method.shared.items()
        }

    def resolve(self, spec: str) -> str:
        """A model spec with relative paths made absolute against ``base_dir`` (aliases, hub ids unchanged)."""
        path = Path(spec).expanduser()
        if not path.is_absolute() and (Path(self.base_dir) / path).exists():
            return str((Path(self.base_dir) / path).resolve())
        return spec


def _parameters_hint(key: str, location: tuple) -> str | None:
    """A method parameter written beside ``parameters`` instead of under it."""
    if key not in ("weight", "density", "lambda", "normalize", "rescale"):
        return None
    parent = ".".join(str(part) for part in location[:-1])
    where = ".".join(str(part) for part in location)
    return f"unknown key '{where}': method parameters go under {parent + '.' if parent else ''}parameters"


def _check_parameter(method: MergeMethod, name: str, value: Any, where: str, per_model_only: bool) -> None:
    valid = sorted(set(method.per_model) | set(method.shared))
    if name not in valid:
        raise InputError(
            f"{where}: unknown parameter '{name}' for merge method {method.name}.{did_you_mean(name, valid)} "
            f"Valid parameters: {', '.join(valid)}"
        )
    if per_model_only and name not in method.per_model:
        raise InputError(f"{where}: '{name}' is shared by all models; put it under the top-level parameters")
    default = method.per_model.get(name, method.shared.get(name))
    expected = type(default)
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
    if not ok:
        raise InputError(f"{where}: parameter '{name}' must be {expected.__name__}, got {value!r}")
    if name == "density" and not 0 < float(value) <= 1:
        raise InputError(
            f"{where}: density must be in (0, 1] (the share of each task vector kept), got {value}"
        )


def check_merge_config(config: MergeConfig, source: str = "merge config") -> None:
    """Cross-field rules: method name, parameter names and types, output options."""
    try:
        method = config.method
    except InputError as error:
        raise InputError(f"{source}: merge_method: {error}") from None
    for name, value in config.parameters.items():
        _check_parameter(method, name, value, f"{source}: parameters", per_model_only=False)
    for index, entry in enumerate(config.models):
        for name, value in entry.parameters.items():
            _check_parameter(method, name, value, f"{source}: models.{index}.parameters", per_model_only=True)
    if method.needs_base and config.base_model is None:
        raise InputError(
            f"{source}: base_model: merge method {method.name} measures task vectors from a base model; "
            "set base_model (or use merge_method: average)"
        )
    if not config.input_entries():
        raise InputError(
            f"{source}: models: every entry is the base model; list the fine-tuned models to merge"
        )
    if config.output == "lora" and method.inputs == "tensors" and config.out_rank is None:
        raise InputError(
            f"{source}: out_rank: output lora re-factorises the merged deltas by SVD; set out_rank (e.g. 16)"
        )
    if method.inputs == "lora_factors" and config.out_rank is not None:
        raise InputError(f"{source}: out_rank: lora_average keeps the adapters' rank; remove out_rank")
    if config.output == "model" and config.out_rank is not None:
        raise InputError(f"{source}: out_rank only applies to output: lora; remove it or set output: lora")
    _dry_run(config, source)


def _dry_run(config: MergeConfig, source: str) -> None:
    """Call the method on 2x2 zeros so that bad values (rescale name, weights summing to 0) fail now."""
    method = config.method
    count = len(config.input_entries())
    per_model = config.per_model_values()
    try:
        if method.inputs == "lora_factors":
            method.function([(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)] * count, **per_model)
        else:
            extra = {"seed": config.seed} if method.random else {}
            method.function(
                torch.zeros(2, 2), [torch.zeros(2, 2)] * count, **per_model, **config.shared_values(), **extra
            )
    except (ValueError, TypeError) as error:
        raise InputError(f"{source}: parameters: {error}") from None


def validate_merge_config(data: dict[str, Any], source: str = "merge config") -> MergeConfig:
    """Pydantic validation plus ``check_merge_config``; one ``InputError`` line on any problem."""
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as error:
        raise InputError(explain(error, source, MergeConfig, hint=_parameters_hint)) from None
    check_merge_config(config, source)
    return config


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML; relative model paths start from the YAML's folder."""
    path = Path(path)
    data = read_yaml_mapping(path, "merge config", "merge_method, base_model and models")
    data.setdefault("base_dir", str(path.parent.resolve()))
    return validate_merge_config(data, str(path))


__all__ = ["MergeConfig", "ModelEntry", "check_merge_config", "load_merge_config", "validate_merge_config"]
