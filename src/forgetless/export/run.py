"""``forgetless export SPEC --for vllm --out DIR``: load, calibrate, write, measure the gap.

Every check that needs no model runs first (the target name, the output folder, the calibration
tasks), so a typo fails in a second. The output folder is written whole or not at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forgetless.data.task import Task
from forgetless.errors import InputError
from forgetless.export.calibration import CalibrationSequence, calibration_sequences, measure_weights
from forgetless.export.experts import adapter_factors
from forgetless.export.gap import measure_gap
from forgetless.export.layout import Layout, describe
from forgetless.export.targets import EXPORT_TARGETS, ExportJob
from forgetless.io import atomic_dir, read_json, write_json
from forgetless.models.load import quiet_transformers

FORMAT = "forgetless-export"
VERSION = 1
#: measures the gap of exports that need no calibration when no task is known
FALLBACK_TASKS = ["general"]
EXACTNESS = (
    "exact (base + adapter = forgetless's forward, up to float rounding): plain LoRA, mixtures with one "
    "LoRA expert and no identity expert, models without adapters, and the router's choice (it reproduces "
    "the sample-level gate); approximate: the token-level routing of a mixture of several experts (or "
    "with identity experts), replaced by each expert's mean routing weight on the calibration tokens"
)


def _stage_tasks(spec: str) -> list[list[str]] | None:
    """The tasks of each stage of a run's stage folder, oldest first; None for other specs."""
    from forgetless.training.runner import DONE_FILE

    folder = Path(spec)
    if not (folder.is_dir() and (folder / DONE_FILE).is_file()):
        return None
    done = read_json(folder / DONE_FILE)
    stages = []
    for item in [folder.parent / name for name in done.get("previous", [])] + [folder]:
        stage = read_json(item / DONE_FILE) if (item / DONE_FILE).is_file() else {}
        stages.append(list(stage.get("trained_on") or [stage.get("task", done["task"])]))
    return stages


def _resolve(names: Sequence[str], seed: int) -> list[Task]:
    from forgetless.evaluation.run import resolve_tasks

    return resolve_tasks(list(names), seed)


def _calibration_tasks(
    layout: Layout, spec: str, given: list[Task] | None, stages: list[list[str]] | None, seed: int
) -> tuple[dict[str, list[Task]], list[Task]]:
    """adapter name -> its calibration tasks, and every task the gap is measured on."""
    approximate = [adapter.name for adapter in layout.adapters if not adapter.exact]
    if given is not None:
        return {adapter.name: given for adapter in layout.adapters}, given
    if stages is not None:
        try:
            per_stage = [_resolve(names, seed) for names in stages]
        except InputError as error:
            if approximate:
                raise InputError(
                    f"{spec}: the stage's calibration tasks cannot be built ({error}); pass "
                    "--calibration TASKS (built-in tasks, suites or task spec files)"
                ) from None
        else:
            union = list({task.name: task for tasks in per_stage for task in tasks}.values())
            if len(layout.adapters) > 1 and len(per_stage) == len(layout.adapters):
                return {a.name: tasks for a, tasks in zip(layout.adapters, per_stage)}, union
            return {adapter.name: union for adapter in layout.adapters}, union
    if approximate:
        raise InputError(
            f"--calibration: the {layout.kind} adapter's expert mixture becomes one LoRA per stage with "
            "the experts' mean routing weights on calibration prompts; name the tasks it was trained on "
            "(e.g. --calibration kelvar_dates,glorp_arithmetic: built-in tasks, suites or task spec files)"
        )
    fallback = _resolve(FALLBACK_TASKS, seed)
    return {adapter.name: fallback for adapter in layout.adapters}, fallback


def _manifest(
    layout: Layout, source: dict, tasks: dict[str, list[Task]], routing: dict, engine: dict, gap: dict
) -> dict[str, Any]:
    adapters = {
        adapter.name: {
            "path": f"adapters/{adapter.name}",
            "stage": adapter.stage,
            "rank": adapter.rank,
            "exact": adapter.exact,
            "calibration_tasks": [task.name for task in tasks.get(adapter.name, [])],
            "routing": routing.get(adapter.name),
            "gap": gap["routes"].get(adapter.name, {"sequences": 0}),
        }
        for adapter in layout.adapters
    }
    first = next(iter(layout.layers.values()), None)
    router = {"file": "router.py", "state": "router.json", "gated": layout.gated}
    if layout.gated:
        router.update(
            gate_stages=layout.gate_stages,
            stage_adapters=layout.stage_adapters,
            yield_threshold=first.config.yield_threshold,
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        **source,
        "kind": layout.kind,
        "base": "base",
        "exact": layout.exact,
        "adapters": adapters,
        "router": router,
        "gap": gap,
        **engine,
        "exactness": EXACTNESS,
    }


def export_model(
    spec: str,
    out: str | os.PathLike,
    *,
    target: str = "vllm",
    adapter: str | os.PathLike | None = None,
    calibration: Sequence[str] | None = None,
    calibration_limit: int = 16,
    overwrite: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Export what ``forgetless eval --model SPEC [--adapter DIR]`` loads for a GPU engine.

    Args:
        spec: model alias, ``.gguf``, HF folder, hub id or a run's stage folder.
        target: an ``EXPORT_TARGETS`` name (``vllm``).
        calibration: tasks whose prompts calibrate mixtures and measure the gap (default: a stage
            folder's own tasks; required for approximate exports of other specs).
        calibration_limit: examples per calibration task.

    Returns:
        The manifest written to ``OUT/export.json``.

    Raises:
        InputError: unknown target, ``out`` exists without ``overwrite``, unknown or missing
            calibration tasks, or a model whose adapters no engine serves.
    """
    from forgetless.evaluation.run import load_model_and_adapter

    try:
        write = EXPORT_TARGETS.get(target)
    except InputError as error:
        raise InputError(f"--for: {error}") from None
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} already exists; choose another folder or pass --overwrite")
    if calibration_limit < 1:
        raise InputError(f"--calibration-limit {calibration_limit}: give at least 1 example per task")
    given = _resolve(calibration, seed) if calibration else None
    quiet_transformers()
    stages = None if given else _stage_tasks(spec)
    model, tokenizer = load_model_and_adapter(spec, adapter, seed=seed)
    model.eval()
    layout = describe(model)
    tasks, gap_tasks = _calibration_tasks(layout, spec, given, stages, seed)
    sequences: dict[str, list[CalibrationSequence]] = {
        task.name: calibration_sequences([task], tokenizer, calibration_limit, seed) for task in gap_tasks
    }
    per_adapter = {name: [s for t in group for s in sequences[t.name]] for name, group in tasks.items()}
    weights, routing = measure_weights(model, layout, per_adapter)
    job = ExportJob(model, tokenizer, layout, adapter_factors(layout, weights), (out / "base").resolve())
    source = {"target": target, "model": str(spec), "adapter": None if adapter is None else str(adapter)}
    source["calibration"] = {"tasks": [t.name for t in gap_tasks], "limit": calibration_limit, "seed": seed}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        engine = write(job, tmp)
        gap = measure_gap(model, layout, tmp, [s for group in sequences.values() for s in group])
        manifest = _manifest(layout, source, tasks, routing, engine, gap)
        write_json(tmp / "export.json", manifest)
    return manifest


def _gap_line(gap: dict) -> str:
    if not gap.get("sequences"):
        return "no calibration sequence took this route"
    return (
        f"max |logit diff| {gap['max_abs_logit_diff']:.2e} (mean over {gap['sequences']} sequences, "
        f"largest {gap['max_abs_logit_diff_max']:.2e}), greedy agreement {100 * gap['token_agreement']:.1f}% "
        f"of tokens, {100 * gap['next_token_agreement']:.1f}% of first answer tokens"
    )


def summary_lines(manifest: dict, out: str | os.PathLike) -> list[str]:
    """What ``forgetless export`` prints: each adapter, exact or approximate, its measured gap."""
    lines = [f"exported {manifest['model']} for {manifest['target']} to {out}: base/"]
    for name, adapter in manifest["adapters"].items():
        how = "exact" if adapter["exact"] else "approximate (mean routing weights)"
        lines.append(f"  adapters/{name}: rank {adapter['rank']}, {how}; {_gap_line(adapter['gap'])}")
    base = manifest["gap"]["routes"].get("base")
    if base:
        lines.append(f"  base model (router said none): {_gap_line(base)}")
    overall = manifest["gap"]["all"]
    if overall.get("sequences"):
        lines.append(f"  all: {_gap_line(overall)}; router agrees with the gate on "
                     f"{100 * overall['route_agreement']:.1f}%")  # fmt: skip
    lines.append(f"serve: cd {out} && {manifest['serve_command']}")
    return lines
