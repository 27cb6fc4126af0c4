"""``forgetless inspect``: route task prompts through a SLIM / MoE-LoRA adapter and summarise.

Glue over ``adapters.routing_diagnostics``: load the adapter's base model (recorded in its
``forgetless_adapter.json``), encode each task's test prompts exactly as evaluation does, and
report, per task, the identity-expert share, expert load and distance statistics per layer.
Comparing an in-task suite with the general suite shows whether weight yielding sends general
inputs to the identity experts (the point of SLIM).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from forgetless.data.task import Task
from forgetless.errors import InputError


def prompt_batches(tokenizer: Any, prompts: list[str], batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Chat-formatted prompts (as evaluation encodes them) in right-padded batches for diagnostics."""
    from forgetless.data import PromptFormatter

    formatter = PromptFormatter(tokenizer)
    encoded = [formatter.prompt_ids(prompt) for prompt in prompts]
    batches = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def resolve_tasks(names: list[str], config_tasks: list[Task] | None = None, seed: int = 0) -> list[Task]:
    """Task and suite names -> tasks: an experiment config's tasks (sequence and general) by name
    first, then the built-in tasks and suites."""
    from forgetless.tasks import expand_task_names, get_task

    known = {task.name: task for task in config_tasks or []}
    resolved = []
    for name in names:
        if name in known:
            resolved.append(known[name])
        else:
            try:
                resolved.extend(get_task(n, seed) for n in expand_task_names([name]))
            except InputError as error:
                if known:
                    raise InputError(f"{error}; the config's tasks: {', '.join(known)}") from None
                raise
    return resolved


def inspect_adapter(
    adapter: str | Path,
    tasks: list[str | Task],
    model_spec: str | None = None,
    limit: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Routing diagnostics of ``adapter`` on the test prompts of each task (``Task`` objects, or
    built-in task and suite names)."""
    from forgetless.adapters import load_adapter
    from forgetless.adapters.diagnostics import routing_diagnostics
    from forgetless.models import load_model

    manifest = Path(adapter) / "forgetless_adapter.json"
    if not manifest.exists():
        raise InputError(f"{adapter} is not a forgetless adapter folder (no forgetless_adapter.json)")
    resolved = [t for t in tasks if isinstance(t, Task)]
    resolved += resolve_tasks([t for t in tasks if isinstance(t, str)], seed=seed)
    base = model_spec or json.loads(manifest.read_text(encoding="utf-8")).get("base_model")
    if not base:
        raise InputError(f"{manifest} records no base model; pass --model")
    model, tokenizer = load_model(base, seed=seed)
    load_adapter(model, adapter)
    report: dict[str, Any] = {"adapter": str(adapter), "model": base, "summary": {}, "tasks": {}}
    for task in resolved:
        name = task.name
        task = task.limited(None, limit, seed)
        result = routing_diagnostics(model, prompt_batches(tokenizer, [e.prompt for e in task.test]))
        report["summary"][name] = {
            key: result[key]
            for key in ("identity_share", "tokens", "yielded_sequences", "gate_score")
            if key in result
        }
        report["tasks"][name] = {
            layer: {key: value for key, value in stats.items() if isinstance(value, (int, float))}
            for layer, stats in result["layers"].items()
        }
    return report
