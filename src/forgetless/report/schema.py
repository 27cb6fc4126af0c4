"""``results.json``: what a run writes and every report reads.

::

    {
      "run":     {...},                       # the run's configuration (free-form; shown in the report)
      "tasks":   ["t1", "t2", ...],           # new-knowledge task columns, in training order
      "general": ["g1", ...],                 # general-suite columns (tasks or families); may be []
      "methods": {
        "NAME": {
          "kind":       "sequential_lora",    # optional: strategy / merge / mix name
          "stages":     ["base", "t1", "t2"], # row labels of the matrices (the base label may be omitted)
          "matrix":     [[..], [..], [..]],   # R: (stages + 1) x len(tasks), scores in [0, 1] or null
          "general":    [[..], [..], [..]],   # G: (stages + 1) x len(general), same rows as R
          "learned_at": [1, 2],               # optional: row after which each task was trained
          "metrics":    {...},                # continual_metrics(R, G, learned_at); filled if absent
          "seconds":    12.3,                 # optional: wall time of the method
          "items":      [{"t1": {"score": [..], "prediction": [..]}, ...}, ...]
                                              # optional: per row, per task (sequence and general),
                                              # every scored item's outcome in item order; a row
                                              # may be null (scored before items were kept)
        }
      }
    }

Row 0 of every matrix is the base model, so every method shares it. ``learned_at`` defaults to
the sequential reading (task j trained in stage j) when there are as many stages as tasks, and
to "all tasks in the one stage" for single-stage methods (joint training, one merge).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from forgetless.errors import InputError
from forgetless.evaluation.metrics import continual_metrics
from forgetless.io import read_json

RESULTS_FILE = "results.json"


def _cells(where: str, rows: Any, width: int, n_rows: int | None) -> None:
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{where} must be a non-empty list of rows (row 0 = the base model)")
    if n_rows is not None and len(rows) != n_rows:
        raise InputError(f"{where} has {len(rows)} rows; expected {n_rows} (the base row + one per stage)")
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            raise InputError(f"{where} row {index} must list {width} scores (one per column)")
        for cell in row:
            if cell is not None and (
                not isinstance(cell, (int, float)) or isinstance(cell, bool) or not math.isfinite(cell)
            ):
                raise InputError(f"{where} row {index} holds {cell!r}; scores must be numbers or null")


def validate_results(results: Any, where: str = RESULTS_FILE) -> None:
    """Raise one ``InputError`` naming the first field that does not follow the schema."""
    if not isinstance(results, dict):
        raise InputError(f"{where}: expected a JSON object with run, tasks, general and methods")
    for key, kind in (("tasks", list), ("methods", dict)):
        if not isinstance(results.get(key), kind):
            raise InputError(f"{where}: '{key}' must be a {kind.__name__} (see forgetless.report.schema)")
    general_names = results.get("general", [])
    if not isinstance(general_names, list):
        raise InputError(f"{where}: 'general' must be a list of general-suite column names")
    if not results["methods"]:
        raise InputError(f"{where}: 'methods' is empty; nothing to report")
    for name, entry in results["methods"].items():
        at = f"{where}: methods.{name}"
        if not isinstance(entry, dict) or "matrix" not in entry:
            raise InputError(f"{at} needs a 'matrix' (rows = base + stages, columns = tasks)")
        _cells(f"{at}.matrix", entry["matrix"], len(results["tasks"]), None)
        rows = len(entry["matrix"])
        stages = entry.get("stages")
        if stages is not None and len(stages) not in (rows, rows - 1):
            raise InputError(f"{at}.stages has {len(stages)} labels for {rows} matrix rows")
        if general_names and entry.get("general") is not None:
            _cells(f"{at}.general", entry["general"], len(general_names), rows)
        learned = entry.get("learned_at")
        if learned is not None and (
            not isinstance(learned, list)
            or len(learned) != len(results["tasks"])
            or any(s is not None and (not isinstance(s, int) or not 1 <= s < rows) for s in learned)
        ):
            raise InputError(f"{at}.learned_at must give, per task, a stage row 1..{rows - 1} or null")


def stage_labels(entry: dict[str, Any]) -> list[str]:
    """One label per matrix row, the base row first."""
    rows = len(entry["matrix"])
    stages = [str(s) for s in entry.get("stages") or []]
    if len(stages) == rows:
        return stages
    if len(stages) == rows - 1:
        return ["base", *stages]
    return ["base", *[f"stage {i}" for i in range(1, rows)]]


def compute_metrics(method_entry: dict[str, Any]) -> dict[str, Any]:
    """``continual_metrics`` of one ``methods.NAME`` entry (matrix, general, learned_at)."""
    general = method_entry.get("general")
    return continual_metrics(
        method_entry["matrix"], general if general and general[0] else None, method_entry.get("learned_at")
    )


def with_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``results`` (validated) whose every method has freshly computed ``metrics``, and
    ``uncertainty`` (``forgetless.evaluation.uncertainty``) where it kept its item outcomes."""
    from forgetless.evaluation.uncertainty import uncertainty

    validate_results(results)
    methods = {}
    for name, entry in results["methods"].items():
        methods[name] = {**entry, "metrics": compute_metrics(entry)}
    out = {**results, "general": results.get("general", []), "methods": methods}
    # intervals and paired comparisons, for the methods that kept their item outcomes
    for name, report in uncertainty(out).items():
        methods[name]["uncertainty"] = report
    return out


def load_results(source: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Results from a dict, a ``results.json`` file, or a run folder holding one (validated)."""
    if isinstance(source, dict):
        validate_results(source, "results")
        return source
    path = Path(source)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise InputError(
            f"{path} does not exist; give a run folder written by 'forgetless run' or its results.json"
        )
    try:
        results = read_json(path)
    except ValueError as error:
        raise InputError(f"{path}: not valid JSON ({error}); re-run the experiment to rewrite it") from None
    validate_results(results, str(path))
    return results
