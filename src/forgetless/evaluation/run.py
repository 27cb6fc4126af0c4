"""One-off evaluation (``forgetless eval``): load a model (+ adapter), score tasks, write JSON.

Output (``out_file``, written atomically)::

    {"model": SPEC, "adapter": DIR | null, "seed": 0, "limit": N | null, "batch_size": 16,
     "style": "auto", "seconds": 12.3,
     "scores": {task: score},                      # the row this model adds to an accuracy matrix
     "general": {family: score},                   # general-suite tasks averaged per family
     "tasks": {task: TaskScore.to_dict()}}         # metric, n, measures, per-example details
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forgetless.data.formatting import Style
from forgetless.data.task import Task
from forgetless.errors import InputError
from forgetless.evaluation.evaluate import TaskScore, evaluate_task
from forgetless.io import write_json
from forgetless.validation import explain, read_yaml_mapping


def resolve_tasks(task_names: Sequence[str], seed: int = 0) -> list[Task]:
    """Built-in task and suite names, or task spec files (``.yaml`` / ``.yml`` / ``.json``) -> tasks."""
    from pydantic import ValidationError

    from forgetless.data.spec import TaskSpec
    from forgetless.tasks import expand_task_names, get_task

    tasks: list[Task] = []
    for name in task_names:
        path = Path(name).expanduser()
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            raw = read_yaml_mapping(path, "task spec file", "a task spec (name, test, metric ...)")
            try:
                spec = TaskSpec.model_validate(raw)
            except ValidationError as error:
                raise InputError(explain(error, str(path), TaskSpec)) from None
            tasks.append(spec.load(path.parent, seed))
        else:
            tasks.extend(get_task(task, seed) for task in expand_task_names([name]))
    if not tasks:
        raise InputError("no tasks given; name built-in tasks or suites (forgetless tasks lists them)")
    return tasks


def general_by_family(scores: dict[str, TaskScore], tasks: Sequence[Task]) -> dict[str, float]:
    """Mean score of the general-suite tasks in each family (the columns of the matrix ``G``)."""
    grouped: dict[str, list[float]] = {}
    for task in tasks:
        if task.kind == "general" and task.name in scores:
            grouped.setdefault(task.family or task.name, []).append(scores[task.name].score)
    return {family: sum(values) / len(values) for family, values in sorted(grouped.items())}


def load_model_and_adapter(
    model_spec: str,
    adapter: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[Any, Any]:
    """The model a spec names (alias, ``.gguf``, HF folder such as a stage's ``model/``, hub id,
    or a run's finished stage folder ``stage-N-task``, rebuilt as the run built it), with a
    forgetless or PEFT adapter folder loaded on top when given: what ``forgetless eval`` scores and
    ``forgetless serve`` serves, loaded by one function so that both see the same model.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from forgetless.models import load_model

    if Path(model_spec).is_dir() and (Path(model_spec) / "done.json").is_file():
        if adapter is not None:
            raise InputError(
                f"{model_spec} is a run's stage folder, which brings its own adapter; drop --adapter "
                "or give the base model with --adapter STAGE/adapter"
            )
        from forgetless.training import load_stage

        return load_stage(model_spec, dtype=dtype)
    model, tokenizer = load_model(model_spec, dtype=dtype, seed=seed)
    if adapter is not None:
        from forgetless.adapters import load_adapter
        from forgetless.adapters.persist import recorded_base_model, same_base_model

        load_adapter(model, adapter)  # refuses other layer shapes
        recorded = recorded_base_model(adapter)
        if recorded is not None and not same_base_model(recorded, str(model_spec)):
            # same shapes, another name: maybe the same model spelt otherwise (a hub id and its
            # local copy), maybe not; names cannot tell, so say it rather than refuse
            print(f"forgetless: note: {adapter} was trained on '{recorded}' and is loaded onto "
                  f"'{model_spec}' (same layer shapes); its scores mean something only if these are "
                  "the same model", file=sys.stderr)  # fmt: skip
    return model.eval(), tokenizer


def run_eval(
    model_spec: str,
    adapter: str | os.PathLike | None,
    task_names: Sequence[str],
    out_file: str | os.PathLike | None,
    limit: int | None = None,
    batch_size: int = 16,
    *,
    seed: int = 0,
    style: Style = "auto",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Load ``model_spec`` (+ ``adapter``), evaluate ``task_names``, write ``out_file`` (if given).

    Tasks are checked before the model is loaded, so a typo fails in a second, not after loading.

    Returns:
        The dict written to ``out_file`` (see the module docstring).
    """
    tasks = resolve_tasks(task_names, seed)
    if out_file is not None and Path(out_file).is_dir():
        raise InputError(
            f"--out {out_file} is a folder; give the path of the JSON file to write, e.g. {Path(out_file) / 'eval.json'}"
        )
    start = time.perf_counter()
    model, tokenizer = load_model_and_adapter(model_spec, adapter, dtype=dtype, seed=seed)
    scores = {
        task.name: evaluate_task(
            model, tokenizer, task, batch_size=batch_size, limit=limit, style=style, seed=seed
        )
        for task in tasks
    }
    result = {
        "model": str(model_spec),
        "adapter": None if adapter is None else str(adapter),
        "seed": seed,
        "limit": limit,
        "batch_size": batch_size,
        "style": style,
        "seconds": round(time.perf_counter() - start, 3),
        "scores": {name: score.score for name, score in scores.items()},
        "general": general_by_family(scores, tasks),
        "tasks": {name: score.to_dict() for name, score in scores.items()},
    }
    if out_file is not None:
        write_json(out_file, result)
    return result
