"""Reports of a run: results.json (schema in ``schema.py``), tables.md, PNG plots, report.html.

from forgetless.report import write_report
write_report("runs/demo")            # reads runs/demo/results.json, writes the report beside it
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from forgetless.errors import InputError
from forgetless.io import atomic_file, write_json, write_text
from forgetless.report.schema import (
    RESULTS_FILE,
    compute_metrics,
    load_results,
    stage_labels,
    validate_results,
    with_metrics,
)

REPORT_FILE = "report.html"
TABLES_FILE = "tables.md"
PLOTS_DIR = "plots"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "method"


def write_report(
    source: str | os.PathLike | dict[str, Any], out_dir: str | os.PathLike | None = None
) -> Path:
    """Write results.json (metrics filled in), tables.md, plots/*.png and report.html.

    Args:
        source: a run folder, a results.json file, or the results dict itself.
        out_dir: where to write; default the run folder (or the file's folder). Required for a dict.

    Returns:
        The path of report.html.

    Raises:
        InputError: the source is missing or does not follow the results schema.
    """
    from forgetless.report import plots
    from forgetless.report.html import render_html
    from forgetless.report.tables import markdown_report

    results = with_metrics(load_results(source))
    if out_dir is None:
        if isinstance(source, dict):
            raise InputError("write_report needs out_dir when given a results dict")
        out_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    heatmaps = {m: plots.heatmap(m, e, results["tasks"]) for m, e in results["methods"].items()}
    summary_plots = {"Knowledge acquisition and retention": plots.acquisition_retention(results)}
    general = plots.general_per_stage(results)
    if general is not None:
        summary_plots["General ability per stage"] = general
    files: dict[str, bytes] = {}
    for method, png in heatmaps.items():
        name = f"heatmap_{_slug(method)}.png"
        if name in files:  # two method names that differ only in punctuation
            name = f"heatmap_{_slug(method)}_{len(files)}.png"
        files[name] = png
    files["acquisition_retention.png"] = summary_plots["Knowledge acquisition and retention"]
    if general is not None:
        files["general_per_stage.png"] = general
    for name, png in files.items():
        with atomic_file(out / PLOTS_DIR / name, "wb") as handle:
            handle.write(png)

    write_json(out / RESULTS_FILE, results)
    write_text(out / TABLES_FILE, markdown_report(results))
    write_text(out / REPORT_FILE, render_html(results, heatmaps, summary_plots))
    return out / REPORT_FILE


__all__ = [
    "PLOTS_DIR",
    "REPORT_FILE",
    "RESULTS_FILE",
    "TABLES_FILE",
    "compute_metrics",
    "load_results",
    "stage_labels",
    "validate_results",
    "with_metrics",
    "write_report",
]
