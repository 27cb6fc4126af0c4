"""PNG plots of a run (matplotlib, headless Agg backend), each returned as PNG bytes.

- ``heatmap``: the accuracy matrix R of one method (rows = base and stages, columns = tasks),
  viridis colours on a fixed [0, 1] scale so that methods compare by colour, values written in.
- ``acquisition_retention``: grouped bars per method, like the paper's Figures 7-8: new knowledge
  (acquisition and what is left at the end) and old knowledge (general score at the end), with
  the base model's levels as dashed lines.
- ``general_per_stage``: mean general-suite score after each stage, one line per method.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # never open a window: reports are written on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from forgetless.report.schema import stage_labels  # noqa: E402

COLORMAP = "viridis"


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # fixed metadata: the same results give byte-identical PNGs (no timestamp / version inside)
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def heatmap(method: str, entry: dict[str, Any], tasks: list[str]) -> bytes:
    """R of one method as a heatmap (NaN for cells that were not evaluated)."""
    matrix = np.array([[np.nan if v is None else v for v in row] for row in entry["matrix"]], dtype=float)
    labels = stage_labels(entry)
    width = max(4.0, 1.0 + 0.9 * len(tasks))
    figure, axes = plt.subplots(figsize=(width, 1.2 + 0.45 * len(labels)))
    image = axes.imshow(matrix, cmap=COLORMAP, vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("task")
    axes.set_ylabel("after stage")
    axes.set_title(f"{method}: accuracy matrix R")
    for (row, column), value in np.ndenumerate(matrix):
        if not np.isnan(value):  # dark text on the light end of viridis, light text on the dark end
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="black" if value > 0.6 else "white")  # fmt: skip
    figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    return _png(figure)


def _last_general(entry: dict[str, Any]) -> float | None:
    return entry["metrics"].get("general_average_per_stage", [None])[-1]


def _error_bars(
    results: dict[str, Any], methods: list[str], metric: str, heights: list[float]
) -> np.ndarray | None:
    """(2, M) distances from each bar's height to its 95% interval (0 where there is none)."""
    found = [
        ((results["methods"][m].get("uncertainty") or {}).get("metrics") or {}).get(metric) for m in methods
    ]
    if not any(found):
        return None
    return _distances(found, heights)


def _distances(bounds: list[Any], heights: list[float]) -> np.ndarray:
    lows = [h - b[0] if b and not np.isnan(h) else 0.0 for b, h in zip(bounds, heights)]
    highs = [b[1] - h if b and not np.isnan(h) else 0.0 for b, h in zip(bounds, heights)]
    return np.clip(np.array([lows, highs]), 0.0, None)


def acquisition_retention(results: dict[str, Any]) -> bytes:
    """Per method: acquisition, final new-knowledge average, final general average (with 95%
    interval bars where the run kept its item outcomes)."""
    methods = list(results["methods"])
    series = {
        "acquisition (new, just learned)": [
            results["methods"][m]["metrics"]["acquisition_average"] for m in methods
        ],
        "retention (new, after last stage)": [
            results["methods"][m]["metrics"]["final_average"] for m in methods
        ],
        "general (old, after last stage)": [_last_general(results["methods"][m]) for m in methods],
    }
    if all(v is None for v in series["general (old, after last stage)"]):
        series.pop("general (old, after last stage)")
    positions = np.arange(len(methods))
    bar = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(5.0, 1.4 * len(methods) + 2), 3.6))
    colors = plt.get_cmap("tab10").colors
    metric_of = dict(zip(series, ("acquisition_average", "final_average", "general_final_average")))
    for index, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        errors = _error_bars(results, methods, metric_of[name], heights)
        axes.bar(
            positions + (index - (len(series) - 1) / 2) * bar, heights, bar, label=name, color=colors[index],
            yerr=errors, capsize=2, error_kw={"linewidth": 0.8},
        )  # fmt: skip
    first = next(iter(results["methods"].values()))
    base_new = first["metrics"]["average_per_stage"][0]
    if base_new is not None:
        axes.axhline(base_new, color=colors[1], linestyle="--", linewidth=1, label="base (new tasks)")
    base_general = first["metrics"].get("general_average_per_stage", [None])[0]
    if base_general is not None and "general (old, after last stage)" in series:
        axes.axhline(base_general, color=colors[2], linestyle=":", linewidth=1, label="base (general)")
    axes.set_xticks(positions, methods, rotation=20, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("score")
    axes.set_title("Knowledge acquisition and retention")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(figure)


def general_per_stage(results: dict[str, Any]) -> bytes | None:
    """Mean general score after each stage per method (with 95% interval bars where the run kept
    its item outcomes); None when the run has no general suite."""
    if not results.get("general"):
        return None
    figure, axes = plt.subplots(figsize=(6.0, 3.4))
    longest: list[str] = []
    for method, entry in results["methods"].items():
        values = entry["metrics"].get("general_average_per_stage")
        if not values:
            continue
        points = [np.nan if v is None else v for v in values]
        bounds = ((entry.get("uncertainty") or {}).get("per_stage") or {}).get("general_average_per_stage")
        errors = _distances(bounds, points) if bounds else None
        drawn = axes.errorbar(range(len(values)), points, yerr=errors, marker="o", capsize=2, label=method)
        scored = [(x, v) for x, v in enumerate(values) if v is not None]
        if len(scored) < len(values):  # stages left unscored (general_stages: last): join the points
            axes.plot(*zip(*scored), linestyle=":", color=drawn.lines[0].get_color())
        longest = max(longest, stage_labels(entry), key=len)
    axes.set_xticks(range(len(longest)), longest, rotation=20, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("mean general score")
    axes.set_xlabel("after stage")
    axes.set_title("General ability per stage")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return _png(figure)
