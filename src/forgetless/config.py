"""The experiment YAML: one validated pydantic model, checked before any compute.

    name: demo
    model: smollm2-135m-instruct
    seed: 0
    setting: semi_cooperative           # or fully_cooperative (replay / joint allowed)
    tasks: [fictional_facts, zorbian_topics, kelvar_dates]   # built-in names or TaskSpec mappings
    limits: {train: 96, test: 24}
    train: {lr: 1.0e-3, epochs: 2, batch_size: 8}            # defaults for every method
    methods:
      - {name: seq_lora, strategy: sequential_lora, params: {r: 16}}
      - {name: seq_fft, strategy: sequential_fft, train: {lr: 5.0e-5}}
      - {name: one_round, strategy: one_round}
      - {name: ties, merge: {method: ties, source: one_round, parameters: {density: 0.2}}}
      - {name: lora_moe, mix: {source: one_round, router: hidden, top_k: 2}}
    evaluation: {general: [general], limit: 24, batch_size: 16}

Unknown keys anywhere are errors with a "Did you mean" suggestion; unknown strategy, merge method,
task or scorer names are errors listing the valid names. ``key.path=value`` overrides from the
command line are applied to the YAML before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from forgetless.data.spec import TaskSpec
from forgetless.errors import InputError
from forgetless.validation import explain, read_yaml_mapping

Setting = Literal["semi_cooperative", "fully_cooperative"]


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: int | None = Field(
        None, ge=1, description="at most this many training examples per task (seeded sample)"
    )
    test: int | None = Field(
        None, ge=1, description="at most this many test examples per task (seeded sample)"
    )


class MergeSpec(BaseModel):
    """Merge the per-task adapters/models of a ``one_round`` method (stage i merges tasks 1..i)."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(
        description="merge method name (average, task_arithmetic, ties, dare, dare_ties, lora_average)"
    )
    source: str = Field(description="name of a one_round method in this config whose outputs are merged")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="method parameters (density, lambda, ...)"
    )
    weights: list[float] | None = Field(None, description="per-model weights; default equal")


class MixSpec(BaseModel):
    """Mix the per-task adapters/models of a ``one_round`` method into an MoE (stage i mixes tasks 1..i)."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(description="name of a one_round method in this config whose outputs become experts")
    router: str = Field(
        "hidden", description="router: hidden (training-free centroids), uniform, random, trained"
    )
    top_k: int = Field(2, ge=1, description="experts per token")
    parameters: dict[str, Any] = Field(default_factory=dict, description="extra mixing parameters")


METHOD_KINDS = ("strategy", "merge", "mix", "variant")


class VariantSpec(BaseModel):
    """Evaluate another method's trained stages with different inference-time adapter settings.

    The dynamic-merging mask ratio, the merge scale, the yielding scale and top-K only decide how
    a trained SLIM / MoE-LoRA adapter is applied, so sweeping them needs no retraining: a variant
    reuses every stage of ``of`` and is scored as a method of its own.
    """

    model_config = ConfigDict(extra="forbid")
    of: str = Field(description="name of a strategy method in this config with a moe_lora or slim adapter")
    adapter: dict[str, Any] = Field(
        min_length=1,
        description="inference-time AdapterConfig fields: mask_ratio, merge_scale, yield_scale, top_k",
    )


class MethodSpec(BaseModel):
    """One row group of the comparison: a strategy, a merge / mix over a one_round method, or a
    variant of a strategy method evaluated with other inference settings."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        description="name in tables and folders (letters, digits, _ . and -)", pattern=r"^[\w.-]+$"
    )
    strategy: str | None = Field(None, description="training strategy (forgetless strategies lists them)")
    params: dict[str, Any] = Field(default_factory=dict, description="strategy parameters")
    train: dict[str, Any] = Field(
        default_factory=dict, description="training settings overriding the run's train"
    )
    merge: MergeSpec | None = None
    mix: MixSpec | None = None
    variant: VariantSpec | None = None
    evaluate: bool = Field(
        True, description="evaluate after every stage (false: train only, e.g. a merge source)"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> MethodSpec:
        kinds = [k for k in METHOD_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"method '{self.name}' needs exactly one of strategy, merge, mix or variant "
                f"(got {kinds or 'none'})"
            )
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in METHOD_KINDS if getattr(self, kind) is not None)


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    general: list[str | TaskSpec] = Field(
        default_factory=lambda: ["general"],
        description="general-ability suites or tasks: built-in names, or task specs over data files "
        "(e.g. ARC-Easy scored by loglik_mc); they are never trained on",
    )
    validation_general: list[str | TaskSpec] | None = Field(
        None,
        description="general-ability probes scored instead of general when split is validation, so that "
        "choosing settings never looks at the reported general probes (default: general; the built-in "
        "general suite then scores its validation items, one in three, which the reported tables never use)",
    )
    split: Literal["test", "validation"] = Field(
        "test",
        description="which split of the sequence tasks is scored: test, or validation (for choosing "
        "hyper-parameters; each task needs a validation file or validation_fraction). Results of a "
        "validation run go to OUT/validation/; trained stages are shared with the test run",
    )
    limit: int | None = Field(None, ge=1, description="at most this many test items per task (seeded sample)")
    general_limit: int | None = Field(
        None,
        ge=1,
        description="at most this many items per general task (a data-file task's own limit_test wins)",
    )
    batch_size: int = Field(16, ge=1, description="evaluation batch size")
    unseen_tasks: bool = Field(
        True,
        description="after each stage, also score the tasks not trained yet (the upper triangle of the "
        "accuracy matrix, needed for forward transfer, FWT); false scores each task from the stage "
        "that learns it on, and leaves the other cells empty",
    )
    general_stages: Literal["every", "last"] = Field(
        "every",
        description="after which stages the general suite is scored: every stage, or only the last "
        "(retention needs the base and the last; the per-stage general plot then has two points)",
    )


class ReportSpec(BaseModel):
    """How the report compares the methods."""

    model_config = ConfigDict(extra="forbid")
    reference: str | None = Field(
        None,
        description="the method every other is compared with, item by item (paired intervals, McNemar); "
        "default: the first sequential-LoRA method, else the first method",
    )


class ExperimentConfig(BaseModel):
    """The whole comparison: model x task sequence x methods, evaluated after every stage."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("experiment", description="experiment name (report title)")
    model: str = Field("smollm2-135m-instruct", description="model alias, .gguf, HF folder or hub id")
    seed: int = Field(0, description="seed for data sampling, training and evaluation")
    setting: Setting = Field(
        "semi_cooperative", description="semi_cooperative (old data gone) or fully_cooperative"
    )
    tasks: list[str | TaskSpec] = Field(min_length=1, description="the task sequence, in training order")
    data_dir: str | None = Field(
        None,
        description="folder that task data paths start from (default: the config file's folder); in the "
        "YAML relative to the config file, as a data_dir=PATH override relative to the current folder",
    )
    schedule: Literal["sequential", "multi_task"] = Field(
        "sequential",
        description="sequential: one stage per task (continual protocol); multi_task: one stage on all tasks "
        "mixed together, as in the SLIM paper's multi-dataset setting (each task still scored on its own)",
    )
    limits: Limits = Field(default_factory=Limits)
    train: dict[str, Any] = Field(default_factory=dict, description="training settings for every method")
    methods: list[MethodSpec] = Field(min_length=1, description="methods to compare")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    output: str | None = Field(None, description="output folder (default runs/<name>)")
    base_dir: str = Field(".", description="folder that relative data paths start from (set by the loader)")

    def data_root(self) -> Path:
        """Where relative task data paths start."""
        return Path(self.base_dir) / self.data_dir if self.data_dir else Path(self.base_dir)

    def task_names(self) -> list[str]:
        return [task if isinstance(task, str) else task.name for task in self.tasks]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict; lists by index."""
    for item in overrides:
        if "=" not in item:
            raise InputError(
                f"override '{item}' is not key=value (e.g. train.lr=1e-4 or methods.0.params.r=8)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise InputError(
                f"override '{item}': the value is not valid YAML ({getattr(error, 'problem', error)}); quote it"
            ) from None
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as text; a user means the number
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        _set_path(data, key, value, item)
    return data


def _set_path(data: dict[str, Any], key: str, value: Any, item: str) -> None:
    """Set ``data[a][b]...[z] = value`` for ``key`` "a.b...z" (list levels by index); a path that
    does not fit the config (an index out of range, a key under a number) is one clear error."""
    node: Any = data
    parts = key.split(".")
    if not all(parts):
        raise InputError(f"override '{item}': the key '{key}' has an empty part; write e.g. train.lr=1e-4")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise InputError(
                    f"override '{item}': {where} is a list of {len(node)}; '{part}' must be an index 0..{len(node) - 1}"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise InputError(
                f"override '{item}': {where} is a value ({node!r}), not a section; '{part}' cannot go under it"
            )


#: fields the loader sets itself (base_dir): not keys a user writes
_SET_BY_LOADER = ("base_dir",)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment YAML; one ``InputError`` line on any problem."""
    path = Path(path)
    data = read_yaml_mapping(path, "config file", "keys (name, model, tasks, methods, ...)")
    data = apply_overrides(data, overrides or [])
    # a data_dir typed on the command line is a path from where the command runs, as any shell
    # argument; one written in the YAML starts from the config file's folder
    given = [item.split("=", 1)[1] for item in overrides or [] if item.split("=", 1)[0] == "data_dir"]
    if given and given[-1] and not Path(given[-1]).expanduser().is_absolute():
        data["data_dir"] = str(Path(given[-1]).expanduser().resolve())
    data.setdefault("base_dir", str(path.parent.resolve()))
    return validate_config(data, str(path))


def validate_config(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Pydantic validation plus the cross-field rules (names, settings, sources)."""
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise InputError(explain(error, source, ExperimentConfig, _SET_BY_LOADER)) from None
    from forgetless.config_checks import check_config

    check_config(config, source)
    return config
