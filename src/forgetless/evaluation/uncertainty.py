"""Uncertainty of every reported number, from the per-item outcomes a run keeps (results.json).

- **A cell** (one task's score at one stage): for binary item scores the Wilson interval
  (``scipy.stats.binomtest(...).proportion_ci(method="wilson")``); for graded scores (ROUGE-L,
  SARI, edit similarity) a percentile bootstrap of the mean over items.
- **A derived metric** (final average, acquisition, BWT, retention, ...): a stratified bootstrap.
  Each draw resamples, *within each task*, the task's items with replacement, and applies the same
  draw to every row (stage) of every method: the items scored after each stage and by each method
  are the same items, so the draw keeps the design paired across stages and methods. Each draw's
  cell means go through ``continual_metrics``, so every metric's interval is computed by exactly
  the code that computes the metric.
- **A paired comparison** (a method minus the reference method): the difference of a metric under
  the same draws, its percentile interval, and for binary items an exact McNemar p-value
  (``scipy.stats.binomtest`` on the discordant items, pooled over the compared tasks).

The stratified, paired resampling is hand-written: ``scipy.stats.bootstrap`` resamples one or
several samples independently (or paired by position within one sample) and cannot apply one draw
per task to many tasks, stages and methods at once, which is what keeps BWT and retention paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binomtest, bootstrap, norm

from forgetless.evaluation.metrics import continual_metrics

LEVEL = 0.95
DRAWS = 2000
#: the derived metrics that get an interval (keys of ``continual_metrics``); retention and the
#: general average need the general suite
METRICS = (
    "final_average",
    "acquisition_average",
    "bwt",
    "bwt_absolute",
    "fwt",
    "retention",
    "general_final_average",
)


#: per-stage metrics (one value per row) that get an interval per row
PER_STAGE = ("average_per_stage", "general_average_per_stage", "retention_per_stage")


def _binary(scores: np.ndarray) -> bool:
    return bool(np.all((scores == 0) | (scores == 1)))


def cell_interval(scores: Sequence[float], level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of one cell's item scores: Wilson for 0/1 scores, else a
    percentile bootstrap (``scipy.stats.bootstrap``, seeded)."""
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        return (math.nan, math.nan)
    if _binary(values):
        ci = binomtest(int(values.sum()), int(values.size)).proportion_ci(level, method="wilson")
        return (float(ci.low), float(ci.high))
    if np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    result = bootstrap(
        (values,), np.mean, confidence_level=level, n_resamples=DRAWS, method="percentile",
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def mcnemar_exact(method: Sequence[float], reference: Sequence[float]) -> float:
    """Exact two-sided McNemar p-value of paired binary outcomes (a binomial test on the
    discordant pairs; 1.0 when there are none)."""
    a, b = np.asarray(method) > 0.5, np.asarray(reference) > 0.5
    only_method, only_reference = int((a & ~b).sum()), int((~a & b).sum())
    if only_method + only_reference == 0:
        return 1.0
    return float(binomtest(only_method, only_method + only_reference, 0.5).pvalue)


def has_items(entry: dict[str, Any], names: Sequence[str]) -> bool:
    """Whether a ``methods.NAME`` entry kept the item outcomes of every row, and of every named
    task in its base row (later rows may leave cells out: ``evaluation.unseen_tasks``,
    ``general_stages``)."""
    items = entry.get("items")
    if not items or len(items) != len(entry["matrix"]):
        return False
    return all(row is not None for row in items) and all(name in items[0] for name in names)


class ItemResampler:
    """Stratified bootstrap draws of a results dict: one index draw per task, shared by every row
    of every method (see the module docstring).

    Args:
        results: a results dict (``forgetless.report.schema``) whose methods kept their items.
        draws, seed: number of bootstrap draws and their seed (same seed, same intervals).
    """

    def __init__(self, results: dict[str, Any], draws: int = DRAWS, seed: int = 0) -> None:
        self.tasks = list(results["tasks"])
        self.general = list(results.get("general") or [])
        names = self.tasks + self.general
        self.methods = {name: entry for name, entry in results["methods"].items() if has_items(entry, names)}
        sizes = {}
        for entry in self.methods.values():
            for row in entry["items"]:
                for name in names:
                    if name in row:
                        sizes.setdefault(name, len(row[name]["score"]))
        rng = np.random.default_rng(seed)
        self.picks = {name: rng.integers(0, size, (draws, size)) for name, size in sizes.items() if size}
        self.draws = draws
        self._samples: dict[str, list[dict[str, Any]]] = {}

    def _cell_draws(self, entry: dict[str, Any], names: Sequence[str]) -> np.ndarray:
        """(draws, rows, len(names)) resampled cell means (NaN where a task has no items)."""
        out = np.full((self.draws, len(entry["items"]), len(names)), np.nan)
        for r, row in enumerate(entry["items"]):
            for c, name in enumerate(names):
                if name not in row:
                    continue  # a cell left out of the evaluation
                scores = np.asarray(row[name]["score"], dtype=float)
                if name in self.picks and scores.size == self.picks[name].shape[1]:
                    out[:, r, c] = scores[self.picks[name]].mean(axis=1)
        return out

    def metric_draws(self, method: str) -> list[dict[str, Any]]:
        """``continual_metrics`` of every draw of one method (computed once, then kept)."""
        if method not in self._samples:
            entry = self.methods[method]
            tasks = self._cell_draws(entry, self.tasks)
            general = self._cell_draws(entry, self.general) if self.general else None
            learned = entry.get("learned_at")
            samples = []
            for d in range(self.draws):
                matrix = [[_cell(v) for v in row] for row in tasks[d]]
                rows = None if general is None else [[_cell(v) for v in row] for row in general[d]]
                metrics = continual_metrics(matrix, rows, learned)
                if rows is not None:
                    metrics["general_final_average"] = metrics["general_average_per_stage"][-1]
                samples.append(metrics)
            self._samples[method] = samples
        return self._samples[method]

    def interval(
        self, method: str, metric: str, level: float = LEVEL, index: int | None = None
    ) -> tuple[float, float] | None:
        """Percentile interval of one metric of one method (None when the metric is undefined);
        ``index`` picks one entry of a per-stage or per-task metric (a list)."""
        values = _values(self.metric_draws(method), metric, index)
        return None if values is None else _percentiles(values, level)

    def difference(
        self, method: str, reference: str, metric: str, level: float = LEVEL
    ) -> dict[str, float] | None:
        """``method - reference`` of one metric under the same draws: its percentile interval."""
        ours = _values(self.metric_draws(method), metric)
        theirs = _values(self.metric_draws(reference), metric)
        if ours is None or theirs is None:
            return None
        low, high = _percentiles(ours - theirs, level)
        return {"low": low, "high": high}


def _cell(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _values(samples: list[dict[str, Any]], metric: str, index: int | None = None) -> np.ndarray | None:
    values = [sample.get(metric) for sample in samples]
    if index is not None:
        values = [None if v is None else v[index] for v in values]
    if any(v is None for v in values):
        return None
    return np.asarray(values, dtype=float)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return (float(low), float(high))


def minimum_detectable_difference(
    n: int, discordance: float, level: float = LEVEL, power: float = 0.8
) -> float:
    """Smallest difference of two paired proportions that McNemar's test detects with ``power``
    on ``n`` paired items: the root in ``delta`` of Connor's (1987) sample-size equation

        sqrt(n) * delta = z_{1-a/2} * sqrt(psi) + z_{power} * sqrt(psi - delta^2)

    where ``psi`` (``discordance``) is the expected share of items on which the two methods
    disagree. ``psi`` itself is the largest difference possible; when even that is not
    detectable, the result is ``psi`` (the study cannot resolve any difference).
    """
    psi = min(max(discordance, 1e-9), 1.0)
    z_level, z_power = norm.ppf(1 - (1 - level) / 2), norm.ppf(power)

    def excess(delta: float) -> float:
        return (
            math.sqrt(n) * delta
            - z_level * math.sqrt(psi)
            - z_power * math.sqrt(max(psi - delta * delta, 0.0))
        )

    if excess(psi) < 0:  # the largest possible difference (every disagreement one way)
        return psi
    return float(brentq(excess, 0.0, psi))


def default_reference(results: dict[str, Any]) -> str | None:
    """The method every other is compared with: ``run.report.reference`` when set, else the first
    sequential-LoRA method, else the first method."""
    methods = results["methods"]
    run = results.get("run") if isinstance(results.get("run"), dict) else {}
    wanted = (run.get("report") or {}).get("reference") if isinstance(run.get("report"), dict) else None
    if wanted in methods:
        return wanted
    # a run's config names each method's strategy; a hand-made results.json may put it in "kind"
    specs = run.get("methods") if isinstance(run.get("methods"), list) else []
    strategies = {spec.get("name"): spec.get("strategy") for spec in specs if isinstance(spec, dict)}
    for name, entry in methods.items():
        if "sequential_lora" in (strategies.get(name), entry.get("kind")):
            return name
    return next(iter(methods), None)


def _final_items(entry: dict[str, Any], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(entry["items"][-1][name]["score"], dtype=float) for name in names])


def uncertainty(results: dict[str, Any], draws: int = DRAWS, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per method with item outcomes: ``n`` per task, the interval of every cell (``cells``:
    ``matrix`` and ``general``, each [low, high] per cell), of every derived metric
    (``metrics``) and per-stage metric (``per_stage``: the rows' averages), and against the reference method (``reference``, ``vs_reference``: the paired
    difference and its interval per metric; ``mcnemar``: exact p-values of the final stage's
    pooled binary items, ``general`` and ``tasks``, None for graded items)."""
    sampler = ItemResampler(results, draws=draws, seed=seed)
    reference = default_reference(results)
    tasks, general = sampler.tasks, sampler.general
    out: dict[str, dict[str, Any]] = {}
    for name, entry in sampler.methods.items():
        first = entry["items"][0]
        cells = {
            key: [
                [
                    list(cell_interval(row[task]["score"], seed=seed)) if task in row else None
                    for task in names
                ]
                for row in entry["items"]
            ]
            for key, names in (("matrix", tasks), ("general", general))
        }
        metrics = {metric: sampler.interval(name, metric) for metric in METRICS}
        stages = {
            metric: [sampler.interval(name, metric, index=i) for i in range(len(entry["items"]))]
            for metric in PER_STAGE
            if metric != "general_average_per_stage" or general
        }
        report: dict[str, Any] = {
            "n": {task: len(first[task]["score"]) for task in tasks + general},
            "cells": cells,
            "metrics": {k: list(v) for k, v in metrics.items() if v is not None},
            "per_stage": {
                k: [None if v is None else list(v) for v in values] for k, values in stages.items()
            },
            "reference": reference,
        }
        if reference in sampler.methods and reference != name:
            report["vs_reference"] = _versus(sampler, name, reference, results["methods"])
            ref_entry = sampler.methods[reference]
            report["mcnemar"] = {
                key: _mcnemar(entry, ref_entry, names)
                for key, names in (("general", general), ("tasks", tasks))
            }
        out[name] = report
    return out


def _versus(sampler: ItemResampler, name: str, reference: str, methods: dict[str, Any]) -> dict[str, Any]:
    versus = {}
    for metric in METRICS:
        interval = sampler.difference(name, reference, metric)
        ours, theirs = _point(methods[name], metric), _point(methods[reference], metric)
        if interval is None or ours is None or theirs is None:
            continue
        versus[metric] = {"difference": ours - theirs, **interval}
    return versus


def _point(entry: dict[str, Any], metric: str) -> float | None:
    metrics = entry.get("metrics") or {}
    if metric == "general_final_average":
        stages = metrics.get("general_average_per_stage")
        return stages[-1] if stages else None
    return metrics.get(metric)


def _mcnemar(entry: dict[str, Any], reference: dict[str, Any], names: Sequence[str]) -> float | None:
    if not names:
        return None
    ours, theirs = _final_items(entry, names), _final_items(reference, names)
    if not (_binary(ours) and _binary(theirs)) or ours.size != theirs.size:
        return None
    return mcnemar_exact(ours, theirs)
