"""``run_strategy``: train a strategy over a task sequence, stage after stage, resumable.

    out_dir/
      stage-0-<task>/   adapter/ or model/   the stage's artifact (written atomically)
                        state/               what the strategy keeps for later stages, if anything
                                             (EWC's Fisher, an episodic memory; strategies/context.py)
                        done.json            what was trained, with which settings, and its summary
                        metrics.jsonl        one line per log_every steps
                        checkpoint/          only while the stage runs (deleted when done)
      stage-1-<task>/ ...

A stage with a ``done.json`` is never trained again: its model is rebuilt from the artifacts
(``load_stage``). A stage killed mid-way resumes from its ``checkpoint/`` and ends with the same
numbers as an uninterrupted run. A ``done.json`` or checkpoint written with other settings (data,
params, training config, base model) is refused with one error naming the folder.

**one_round** (``produces == "per_task"``): stage i trains task i from the base model; the callback
gets that per-task model. Those models are the *inputs* of merging and mixing: the runner should
not read row i of one_round's matrix as a continual result, but merge/mix the artifacts of
``results[:i + 1]`` (``StageResult.artifact``: PEFT-loadable LoRA folders for mode lora, HF model
folders for mode fft) to get row i of a merge or mix method.

Under ``accelerate launch`` every process trains (each takes its share of every batch); only the
main process writes files and calls ``on_stage_end``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from forgetless.adapters.config import AdapterConfig
from forgetless.adapters.persist import saved_config
from forgetless.data.formatting import Encoded, PromptFormatter
from forgetless.data.task import Example, Task
from forgetless.errors import InputError
from forgetless.io import content_key, read_json, write_json
from forgetless.strategies.context import StageContext
from forgetless.training.checkpoint import CHECKPOINT_DIR, has_checkpoint
from forgetless.training.config import TrainConfig
from forgetless.training.loop import TrainSummary, make_accelerator, train_model

if TYPE_CHECKING:
    from forgetless.strategies import ModelSource, Strategy

DONE_FILE = "done.json"
StageCallback = Callable[[int, nn.Module, Any], None]


@dataclass
class StageResult:
    """One finished stage.

    Attributes:
        stage: 0-based index in the task sequence.
        task: the task this stage adds (the sequence's task ``stage``).
        folder: the stage folder (``out_dir/stage-{i}-{task}``).
        artifact: the saved adapter folder (``adapter/``) or full model folder (``model/``).
        artifact_kind: ``adapter`` or ``model``.
        strategy, params: what trained it (params with defaults filled in).
        produces: ``model``, ``adapter`` or ``per_task`` (one_round).
        trained_on: examples per task in this stage's data (replay and joint mix several).
        summary: the training summary (steps, losses, tokens, seconds, tokens_per_s).
        cached: True when the stage was already done and was not trained in this call.
    """

    stage: int
    task: str
    folder: Path
    artifact: Path
    artifact_kind: str
    strategy: str
    params: dict[str, Any]
    produces: str
    trained_on: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    cached: bool = False


def stage_folder(out_dir: Path, stage: int, task_name: str) -> Path:
    """``out_dir/stage-{stage}-{task}`` with characters outside [A-Za-z0-9_.-] replaced by '_'."""
    safe_name = re.sub(r"[^\w.-]", "_", task_name)
    return Path(out_dir) / f"stage-{stage}-{safe_name}"


def _encode(
    groups: list[tuple[Task, list[Example]]], tokenizer: PreTrainedTokenizerBase, config: TrainConfig
) -> tuple[list[Encoded], dict[str, int]]:
    encoded, counts = [], {}
    for task, examples in groups:
        system_prompt = config.system_prompt if config.system_prompt is not None else task.system_prompt
        formatter = PromptFormatter(tokenizer, config.prompt_style, system_prompt, config.max_length)
        encoded.extend(formatter.encode(example) for example in examples)
        counts[task.name] = counts.get(task.name, 0) + len(examples)
    return encoded, counts


def _read_done(folder: Path, fingerprint: str) -> dict | None:
    path = folder / DONE_FILE
    if not path.is_file():
        return None
    try:
        done = read_json(path)
    except (OSError, ValueError) as error:
        raise InputError(
            f"{path} is unreadable ({error}); delete {folder} to train the stage again"
        ) from None
    if done.get("fingerprint") != fingerprint:
        raise InputError(
            f"{folder} holds a stage trained with other settings (data, params, training config or "
            "base model changed); delete it to train again, or choose another output folder"
        )
    return done


#: Adapter fields that decide only how a trained adapter is applied while masking is
#: inference-only (``mask_in_training`` off): a stage saved with other values is still what today's
#: settings would train, so it is reused and the current values are applied when it is loaded.
APPLY_ONLY_FIELDS = ("mask_ratio", "merge_scale")


def applied_options(model: nn.Module, folder: Path) -> dict[str, Any]:
    """The ``APPLY_ONLY_FIELDS`` with which ``model`` (the model after the stage in ``folder``, as
    ``on_stage_end`` gets it) is applied differently from how the stage's adapter was saved: the
    current values of a reused stage saved under older defaults. Callers that cache scores key on
    them; {} for a stage saved with today's values or a model without routed adapters."""
    from forgetless.adapters import adapter_layers

    routed = [layer for layer in adapter_layers(model).values() if layer.routed]
    done_path = folder / DONE_FILE
    if not routed or not done_path.is_file():
        return {}
    saved_path = folder / str(read_json(done_path).get("artifact", "")) / "forgetless_adapter.json"
    if not saved_path.is_file():
        return {}
    saved, current = saved_config(read_json(saved_path)), routed[0].config.model_dump()
    return {k: current[k] for k in APPLY_ONLY_FIELDS if k in saved and saved[k] != current[k]}


def _check_adapter_settings(folder: Path, done: dict, strategy: Any, seed: int) -> dict[str, Any]:
    """A finished stage's saved adapter config must be what the strategy builds today.

    The fingerprint covers the params a user wrote, not the package's defaults behind them: after
    an upgrade that changes a default (SLIM's mask ratio, say) a reused stage would silently keep
    the old value. The saved config is the ground truth, so it is compared field by field (the
    seed aside: continued adapters keep their first stage's).

    Returns:
        The ``APPLY_ONLY_FIELDS`` that differ, with today's values, to apply on load; any other
        difference is an ``InputError`` (the stage would train differently today).
    """
    make_config = getattr(strategy.engine, "config", None)
    saved_path = folder / str(done.get("artifact", "")) / "forgetless_adapter.json"
    if make_config is None or not saved_path.is_file():
        return {}
    saved = saved_config(read_json(saved_path))
    wanted = make_config(seed).model_dump()
    # the seed aside, and fields the engine derives from the tokenizer when it builds the adapter
    derived = {"seed", *AdapterConfig.DERIVED_FIELDS}
    changed = sorted(k for k in wanted if k not in derived and k in saved and saved[k] != wanted[k])
    inference_only = not saved.get("mask_in_training") and not wanted.get("mask_in_training")
    apply = {k: wanted[k] for k in changed if inference_only and k in APPLY_ONLY_FIELDS}
    retrain = [k for k in changed if k not in apply]
    if retrain:
        key = retrain[0]
        raise InputError(
            f"{folder} holds an adapter trained with {key}={saved[key]!r}, but the settings now give "
            f"{key}={wanted[key]!r} (a changed default?); delete the folder to train again, or choose "
            "another output folder"
        )
    return apply


def _result(folder: Path, done: dict, cached: bool) -> StageResult:
    return StageResult(
        stage=done["stage"],
        task=done["task"],
        folder=folder,
        artifact=folder / done["artifact"],
        artifact_kind=done["artifact"],
        strategy=done["strategy"],
        params=done["params"],
        produces=done["produces"],
        trained_on=done["trained_on"],
        summary=done["summary"],
        cached=cached,
    )


def run_strategy(
    strategy_name: str,
    params: dict[str, Any] | None,
    base_model_spec: str,
    tasks: Sequence[Task],
    train_config: TrainConfig | dict[str, Any] | None,
    out_dir: str | Path,
    setting: str = "semi_cooperative",
    on_stage_end: StageCallback | None = None,
    dtype: torch.dtype | str = torch.float32,
    label: str | None = None,
) -> list[StageResult]:
    """Train ``strategy_name`` over ``tasks`` in order; one ``StageResult`` per task.

    Args:
        strategy_name: a name in ``forgetless.strategies.STRATEGIES``.
        params: the strategy's params (validated; unknown keys are an ``InputError``).
        base_model_spec: the base model (alias, .gguf, HF folder, hub id).
        tasks: the task sequence; every task needs training examples.
        train_config: ``TrainConfig`` or a mapping of its fields.
        out_dir: folder of the stage folders (created).
        setting: ``semi_cooperative`` or ``fully_cooperative`` (replay and joint need the latter).
        on_stage_end: ``callback(stage_index, model, tokenizer)`` after each stage, main process
            only; ``model`` is the model after that stage in eval mode (see the module docstring
            for one_round).
        dtype: weight dtype of the loaded models.
        label: the name the progress bar shows (default ``strategy_name``; a run's method name).

    Raises:
        InputError: bad strategy name, params, setting, training config, empty task, or a stage
            folder written with other settings. ``TrainingDivergedError`` on a NaN/inf loss.
    """
    from forgetless.strategies import ModelSource

    strategy, config = _checked(strategy_name, params, tasks, setting, train_config)
    source = ModelSource(base_model_spec, dtype, seed=config.seed)  # the seed only matters for tiny models
    lr = config.lr if config.lr is not None else strategy.default_lr
    accelerator = make_accelerator(config.mixed_precision)
    results: list[StageResult] = []
    previous_fingerprint = ""
    reapplied: dict[str, Any] = {}  # APPLY_ONLY_FIELDS of reused stages, today's values
    for stage, task in enumerate(tasks):
        folder = stage_folder(Path(out_dir), stage, task.name)
        data_fingerprints = [tasks[index].fingerprint() for index in strategy.data_tasks(stage)]
        fingerprint = content_key(
            strategy.describe(),
            str(source.spec),
            config.fingerprint(),  # includes the seed, hence the tiny models' weights
            lr,
            stage,
            data_fingerprints,
            previous_fingerprint if strategy.engine.uses_previous else "",
        )
        done = _read_done(folder, fingerprint)
        if done is not None:
            reapplied.update(_check_adapter_settings(folder, done, strategy, config.seed + stage))
            if accelerator.is_main_process:  # a kill between done.json and the delete left it
                shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
            results.append(_result(folder, done, cached=True))
        else:
            run = _StageRun(strategy, source, config, lr, accelerator, label or strategy_name)
            done = run.train(stage, tasks, folder, results, fingerprint)
            results.append(_result(folder, done, cached=False))
        previous_fingerprint = fingerprint
        if on_stage_end is not None and accelerator.is_main_process:
            model = strategy.load(stage, source, [r.artifact for r in results])
            if reapplied:
                from forgetless.adapters import set_inference_options

                set_inference_options(model, **reapplied)
            on_stage_end(stage, model, source.tokenizer)
            del model
    return results


def _checked(
    strategy_name: str,
    params: dict[str, Any] | None,
    tasks: Sequence[Task],
    setting: str,
    train_config: TrainConfig | dict[str, Any] | None,
) -> tuple[Strategy, TrainConfig]:
    """The strategy and training config of a run, after every check that needs no model."""
    from forgetless.strategies import check_setting, make_strategy

    check_setting(strategy_name, setting)
    strategy = make_strategy(strategy_name, params, source=f"strategy {strategy_name} params")
    config = TrainConfig.coerce(train_config)
    if not tasks:
        raise InputError("run_strategy: the task sequence is empty; give at least one task")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise InputError(
            f"run_strategy: task names repeat ({', '.join(names)}); give each task a unique name"
        )
    for task in tasks:
        if not task.train:
            raise InputError(f"task '{task.name}' has no training examples; give it a train split")
    return strategy, config


@dataclass
class _StageRun:
    """What every trained stage of one ``run_strategy`` call shares."""

    strategy: Strategy
    source: ModelSource
    config: TrainConfig
    lr: float
    accelerator: Any
    label: str

    def train(
        self, stage: int, tasks: Sequence[Task], folder: Path, results: list[StageResult], fingerprint: str
    ) -> dict[str, Any]:
        """Build, train (hooks around the loop), save and mark done one stage; its done.json record."""
        strategy, source, config = self.strategy, self.source, self.config
        tokenizer, main = source.tokenizer, self.accelerator.is_main_process
        model = strategy.build(stage, source, [result.artifact for result in results], config.seed)
        encoded, counts = _encode(strategy.stage_data(stage, tasks, config.seed), tokenizer, config)
        context = StageContext(
            stage=stage, tasks=tasks, model=model, tokenizer=tokenizer, examples=encoded,
            pad_id=tokenizer.pad_token_id, seed=config.seed, folder=folder,
            previous=[result.folder for result in results], resumed=has_checkpoint(folder), main=main,
            trained_on=counts,
            formatter=PromptFormatter(tokenizer, config.prompt_style, config.system_prompt, config.max_length),
        )  # fmt: skip
        strategy.before_training(context)
        summary: TrainSummary = train_model(
            model, encoded, config, lr=self.lr, pad_id=tokenizer.pad_token_id, folder=folder,
            extra_loss=strategy.extra_loss, before_step=strategy.before_step, after_step=strategy.after_step,
            strategy_tensors=strategy.checkpoint_tensors,
            description=f"{self.label} {stage + 1}/{len(tasks)} {tasks[stage].name}", fingerprint=fingerprint,
        )  # fmt: skip
        strategy.after_training(context)  # its state is written before done.json
        done = {
            "stage": stage,
            "task": tasks[stage].name,
            "tasks": [task.name for task in tasks],
            **strategy.describe(),
            "produces": strategy.produces,
            "base_model": source.spec,
            "model_seed": source.seed,
            "artifact": strategy.engine.artifact,
            "previous": [result.folder.name for result in results],
            "trained_on": context.trained_on,
            "train": config.model_dump(),
            "lr": self.lr,
            "summary": summary.to_dict(),
            "fingerprint": fingerprint,
        }
        if main:
            strategy.save(model, folder / strategy.engine.artifact, source)
            write_json(folder / DONE_FILE, done)  # the stage counts as done from here on
            shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return done


def load_stage(
    stage: StageResult | str | Path,
    base_model_spec: str | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[nn.Module, Any]:
    """Rebuild the model after a finished stage from its folder (and its earlier stages' artifacts).

    Args:
        stage: a ``StageResult`` or a stage folder (holding ``done.json``).
        base_model_spec: the base model; default the one recorded in ``done.json``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from forgetless.strategies import ModelSource, make_strategy

    folder = Path(stage.folder if isinstance(stage, StageResult) else stage)
    path = folder / DONE_FILE
    if not path.is_file():
        raise InputError(
            f"{folder} is not a finished stage folder (no {DONE_FILE}); give a stage-N-task folder"
        )
    done = read_json(path)
    strategy = make_strategy(done["strategy"], done["params"], source=str(path))
    source = ModelSource(base_model_spec or done["base_model"], dtype, seed=done.get("model_seed", 0))
    stage_folders = [folder.parent / name for name in done["previous"]] + [folder]
    artifacts = []
    for item in stage_folders:
        item_done = item / DONE_FILE
        if not item_done.is_file():
            raise InputError(f"{item} (an earlier stage of {folder}) is missing or unfinished; it is needed")
        artifacts.append(item / read_json(item_done)["artifact"])
    model = strategy.load(done["stage"], source, artifacts)
    return model, source.tokenizer


def results_table(results: Sequence[StageResult]) -> list[dict[str, Any]]:
    """Flat rows (stage, task, artifact, steps, final_loss, seconds, cached) for printing or JSON."""
    rows = []
    for result in results:
        row = {key: value for key, value in asdict(result).items() if key not in ("summary", "params")}
        row.update({key: result.summary.get(key) for key in ("steps", "final_loss", "seconds")})
        row["folder"], row["artifact"] = str(result.folder), str(result.artifact)
        rows.append(row)
    return rows
