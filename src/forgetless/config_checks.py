"""Checks of a whole experiment config before any compute: every strategy, variant, merge and mix
is built or validated as the run will build it, so a typo fails in a second, not after training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forgetless.errors import InputError
from forgetless.registry import did_you_mean

if TYPE_CHECKING:
    from forgetless.config import ExperimentConfig, MergeSpec, MethodSpec, MixSpec
    from forgetless.data.spec import TaskSpec


def check_config(config: ExperimentConfig, source: str = "config") -> None:
    """Registry names, setting rules and merge/mix sources; raises one ``InputError``."""
    from forgetless.tasks import expand_task_names

    names = [method.name for method in config.methods]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"{source}: methods: duplicate method name '{duplicates[0]}'; names must be unique")
    task_names = config.task_names()
    if len(set(task_names)) != len(task_names):
        raise InputError(f"{source}: tasks: a task appears twice in the sequence; give each a unique name")
    builtin = [task for task in config.tasks if isinstance(task, str)]
    if config.data_dir is not None and not config.data_root().is_dir():
        raise InputError(
            f"{source}: data_dir: folder {config.data_root()} does not exist; pass data_dir=PATH"
        )
    try:
        expand_task_names(builtin)
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
    reference = config.report.reference
    if reference is not None and reference not in [m.name for m in config.methods if m.evaluate]:
        raise InputError(
            f"{source}: report.reference: '{reference}' is not an evaluated method of this config."
            f"{did_you_mean(reference, names)} Name one of: {', '.join(m.name for m in config.methods if m.evaluate)}"
        )
    for field in ("general", "validation_general"):
        _check_general(getattr(config.evaluation, field) or [], task_names, f"{source}: evaluation.{field}")
    for index, method in enumerate(config.methods):
        where = f"{source}: methods.{index} ('{method.name}')"
        if method.strategy:
            _check_strategy(method, config, where, source)
        elif method.variant:
            _check_variant(method, config, where)
        else:
            spec = method.merge or method.mix
            if spec.source not in names:
                raise InputError(
                    f"{where}: source '{spec.source}' is not a method of this config.{did_you_mean(spec.source, names)}"
                )
            source_method = config.methods[names.index(spec.source)]
            if source_method.strategy != "one_round":
                raise InputError(
                    f"{where}: source '{spec.source}' must use strategy one_round (it trains one model per task)"
                )
            outputs = len(task_names) if config.schedule == "sequential" else 1
            if method.merge:
                _check_merge_method(method.merge.method, where)
                _check_merge(method.merge, config, outputs, where)
            else:
                _check_mix(method.mix, config, outputs, where)


def _check_strategy(method: MethodSpec, config: ExperimentConfig, where: str, source: str) -> None:
    """Strategy name, its setting, its params and the merged training settings, before compute."""
    from forgetless.strategies import check_setting, make_strategy
    from forgetless.training import TrainConfig

    try:
        check_setting(method.strategy, config.setting)
        make_strategy(method.strategy, method.params, source="params")
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    # a mistake in the run-level train section is the run's, not this method's: name it so
    for scope, settings in ((source, config.train), (where, {**config.train, **method.train})):
        TrainConfig.coerce({"seed": config.seed, **settings}, source=scope, at=("train",))


def _check_general(entries: list[str | TaskSpec], task_names: list[str], where: str) -> None:
    from forgetless.tasks import expand_task_names

    try:
        names = expand_task_names([entry for entry in entries if isinstance(entry, str)])
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    names += [entry.name for entry in entries if not isinstance(entry, str)]
    clash = sorted({name for name in names if names.count(name) > 1 or name in task_names})
    if clash:
        raise InputError(
            f"{where}: task '{clash[0]}' appears twice (or is also a sequence task); "
            "give each general task a unique name"
        )


def _check_variant(method: MethodSpec, config: ExperimentConfig, where: str) -> None:
    """The variant's source is a routed-adapter strategy method and its settings are inference-only."""
    from forgetless.adapters import INFERENCE_FIELDS, AdapterConfig
    from forgetless.strategies import make_strategy

    spec = method.variant
    methods = {m.name: m for m in config.methods}
    source_method = methods.get(spec.of)
    if source_method is None or not source_method.strategy:
        strategies = [m.name for m in config.methods if m.strategy]
        raise InputError(
            f"{where}: variant.of: '{spec.of}' is not a strategy method of this config."
            f"{did_you_mean(spec.of, strategies)} Strategy methods: {', '.join(strategies) or 'none'}"
        )
    for key in spec.adapter:
        if key not in INFERENCE_FIELDS:
            raise InputError(
                f"{where}: variant.adapter: '{key}' is not an inference-time setting.{did_you_mean(key, list(INFERENCE_FIELDS))} "
                f"A variant may set {', '.join(INFERENCE_FIELDS)}; anything else needs its own strategy method"
            )
    strategy = make_strategy(source_method.strategy, source_method.params, source="params")
    kind = getattr(strategy.engine, "kind", None)
    from forgetless.adapters.base import ADAPTER_LAYERS

    if kind is None or not ADAPTER_LAYERS.get(kind).routed:
        raise InputError(
            f"{where}: variant.of: '{spec.of}' trains no routed adapter such as moe_lora or slim (strategy "
            f"{source_method.strategy}); variants change routed adapters only"
        )
    fields = {**strategy.engine.fields, "kind": kind}
    trained = AdapterConfig.from_dict(fields, source=f"{where}: variant.of")
    varied = AdapterConfig.from_dict({**fields, **spec.adapter}, source=f"{where}: variant.adapter")
    if varied.uses_clustering and not trained.uses_clustering:
        raise InputError(
            f"{where}: variant.adapter: yield_scale > 0 needs sliding clustering, which '{spec.of}' did not "
            "train (no identity experts or yield_scale 0); train a method with yielding instead"
        )


def merge_of_outputs(spec: MergeSpec, base_model: str, inputs: list[str], seed: int) -> dict[str, Any]:
    """The merge config (unvalidated) of a run's merge of ``inputs`` (the first task outputs):
    the runner merges with it, and the config check runs it on placeholders before training."""
    weights = spec.weights or [1.0] * len(inputs)
    return {
        "merge_method": spec.method,
        "base_model": base_model,
        "models": [{"model": str(path), "parameters": {"weight": w}} for path, w in zip(inputs, weights)],
        "parameters": spec.parameters,
        "seed": seed,
    }


def _check_merge(spec: MergeSpec, config: ExperimentConfig, outputs: int, where: str) -> None:
    """The merge of the last stage (every task output), checked on placeholders before any
    training: weights, parameter names, types and values (the method runs on 2x2 zeros)."""
    from forgetless.merging.config import validate_merge_config

    if spec.weights is not None and len(spec.weights) != outputs:
        raise InputError(
            f"{where}: merge.weights has {len(spec.weights)} weight(s) for {outputs} task output(s); "
            "give one weight per task, in sequence order (stage i merges the first i)"
        )
    placeholders = [f"task-{i + 1}" for i in range(outputs)]
    data = merge_of_outputs(spec, config.model, placeholders, config.seed)
    validate_merge_config(data, f"{where}: merge")


def _check_mix(spec: MixSpec, config: ExperimentConfig, outputs: int, where: str) -> None:
    """The mix of the last stage, checked on placeholder experts before any training: router
    name, top_k and every mixing parameter."""
    from forgetless.mixing.config import MixConfig, validate_mix_config
    from forgetless.mixing.run import mix_of_outputs

    set_here = {"base_model", "experts", "router", "top_k", "seed", "base_dir"}
    valid = sorted(set(MixConfig.model_fields) - set_here)
    for name in spec.parameters:
        if name in set_here:
            raise InputError(
                f"{where}: mix.parameters: '{name}' is set by the run; remove it (router and top_k go under mix)"
            )
        if name not in valid:
            raise InputError(
                f"{where}: mix.parameters: unknown parameter '{name}'.{did_you_mean(name, valid)} Valid: {', '.join(valid)}"
            )
    total = outputs + int(spec.parameters.get("num_identity_experts", 0) or 0)
    if spec.router != "uniform" and spec.top_k > total:
        raise InputError(
            f"{where}: mix.top_k {spec.top_k} is more than the {total} expert(s) of the last stage; "
            f"set top_k <= {total} (earlier stages, with fewer experts, use them all)"
        )
    placeholders = [f"task-{i + 1}" for i in range(outputs)]
    data = mix_of_outputs(config.model, placeholders, spec.router, spec.top_k, config.seed, **spec.parameters)
    validate_mix_config(data, f"{where}: mix", tasks_given=[True] * outputs)


def _check_merge_method(name: str, where: str) -> None:
    from forgetless.merging import MERGE_METHODS

    try:
        MERGE_METHODS.get(name)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
