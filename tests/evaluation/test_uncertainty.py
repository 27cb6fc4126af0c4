"""Intervals and paired tests: coverage checked by simulation, McNemar against a hand count,
the stratified bootstrap against the metric code it resamples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from forgetless.evaluation.metrics import continual_metrics
from forgetless.evaluation.uncertainty import (
    ItemResampler,
    cell_interval,
    mcnemar_exact,
    minimum_detectable_difference,
)


def test_wilson_interval_covers_the_true_rate_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    n, p, covered = 120, 0.35, 0
    for _ in range(2000):
        scores = (rng.random(n) < p).astype(float)
        low, high = cell_interval(scores)
        covered += low <= p <= high
    assert 0.94 <= covered / 2000 <= 0.96


def test_graded_cells_use_a_bootstrap_of_the_mean():
    rng = np.random.default_rng(1)
    covered = 0
    for seed in range(300):
        scores = rng.beta(2, 5, size=150)  # graded scores in [0, 1], true mean 2/7
        low, high = cell_interval(scores, seed=seed)
        assert low < scores.mean() < high
        covered += low <= 2 / 7 <= high
    assert 0.91 <= covered / 300 <= 0.99  # 300 draws: binomial spread around 0.95
    assert cell_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_mcnemar_exact_is_the_binomial_test_of_discordant_pairs():
    method = [1, 1, 1, 1, 1, 0, 0, 1, 1, 1]
    reference = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    # discordant: method only 5, reference only 1 -> two-sided exact binomial p
    expected = min(1.0, 2 * binom.cdf(1, 6, 0.5))
    assert mcnemar_exact(method, reference) == pytest.approx(expected)
    assert mcnemar_exact(reference, reference) == 1.0


def _results(rng, n=80, rates=((0.2, 0.1), (0.9, 0.2), (0.6, 0.9)), general_rates=(0.7, 0.6, 0.5)):
    """Two tasks learned in sequence, one general task; items drawn per row."""
    items, matrix, general = [], [], []
    for (a, b), g in zip(rates, general_rates):
        row = {
            "t1": {"score": list((rng.random(n) < a).astype(float)), "prediction": [""] * n},
            "t2": {"score": list((rng.random(n) < b).astype(float)), "prediction": [""] * n},
            "g": {"score": list((rng.random(n) < g).astype(float)), "prediction": [""] * n},
        }
        items.append(row)
        matrix.append([float(np.mean(row["t1"]["score"])), float(np.mean(row["t2"]["score"]))])
        general.append([float(np.mean(row["g"]["score"]))])
    return {"matrix": matrix, "general": general, "items": items, "stages": ["base", "t1", "t2"]}


def test_metric_intervals_bracket_the_metric_and_differences_are_paired():
    rng = np.random.default_rng(2)
    entry = _results(rng)
    same = {**entry}
    results = {"tasks": ["t1", "t2"], "general": ["g"], "methods": {"a": entry, "b": same}}
    sampler = ItemResampler(results, draws=500, seed=0)
    metrics = continual_metrics(entry["matrix"], entry["general"])
    for metric in ("final_average", "acquisition_average", "bwt_absolute", "retention"):
        low, high = sampler.interval("a", metric)
        assert low <= metrics[metric] <= high and low < high
    # a method against itself: every paired draw differs by exactly 0
    assert sampler.difference("a", "b", "retention") == {"low": 0.0, "high": 0.0}
    # same seed, same intervals
    again = ItemResampler(results, draws=500, seed=0)
    assert again.interval("a", "bwt") == sampler.interval("a", "bwt")


def test_retention_interval_covers_the_truth_by_simulation():
    """Retention = general mean after the last stage / base's: coverage of the stratified
    bootstrap over 200 simulated studies (each 300 draws)."""
    rng = np.random.default_rng(3)
    truth, covered = 0.5 / 0.7, 0
    for seed in range(200):
        entry = _results(rng, n=150)
        results = {"tasks": ["t1", "t2"], "general": ["g"], "methods": {"a": entry}}
        low, high = ItemResampler(results, draws=300, seed=seed).interval("a", "retention")
        covered += low <= truth <= high
    assert 0.89 <= covered / 200 <= 0.99


def test_rows_without_items_get_no_interval():
    rng = np.random.default_rng(4)
    entry = _results(rng)
    old = {k: v for k, v in entry.items() if k != "items"}
    results = {"tasks": ["t1", "t2"], "general": ["g"], "methods": {"new": entry, "old": old}}
    assert set(ItemResampler(results, draws=50).methods) == {"new"}


def test_minimum_detectable_difference_shrinks_with_more_items():
    small = minimum_detectable_difference(100, discordance=0.3)
    large = minimum_detectable_difference(400, discordance=0.3)
    assert large < small
    assert large == pytest.approx(small / 2, rel=0.15)
    # more disagreement between the methods: a larger difference is needed
    assert minimum_detectable_difference(100, 0.5) > small
    # never more than the disagreement rate itself (the largest possible difference)
    assert minimum_detectable_difference(150, 0.02) <= 0.02
    # the textbook case (Connor 1987): psi 0.2, 5% two-sided, 80% power, delta 0.1 needs ~155 pairs
    assert minimum_detectable_difference(155, 0.2) == pytest.approx(0.1, abs=0.003)


def test_the_detectable_difference_is_detected_about_80_percent_of_the_time():
    """Simulated studies at the returned size: the exact McNemar test finds the difference with
    about the promised power (a little less: the exact test is conservative)."""
    rng = np.random.default_rng(5)
    n, psi = 200, 0.25
    delta = minimum_detectable_difference(n, psi)
    only_method = (psi + delta) / 2  # the rest of psi: reference right, method wrong
    found = 0
    for _ in range(1000):
        u = rng.random(n)
        method = (u < only_method).astype(float)  # method right, reference wrong
        reference = ((u >= only_method) & (u < psi)).astype(float)  # the other way round
        found += mcnemar_exact(method, reference) < 0.05
    assert 0.70 <= found / 1000 <= 0.88


def test_mcnemar_and_bootstrap_agree_with_the_library_reference_values():
    from scipy.stats import binomtest, bootstrap

    rng = np.random.default_rng(6)
    method, reference = (rng.random(300) < 0.6).astype(float), (rng.random(300) < 0.5).astype(float)
    b = int(((method == 1) & (reference == 0)).sum())
    c = int(((method == 0) & (reference == 1)).sum())
    assert mcnemar_exact(method, reference) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    # one task, one stage: the stratified bootstrap of the final average is the percentile
    # bootstrap of one sample's mean (scipy), up to Monte Carlo error
    scores = (rng.random(200) < 0.3).astype(float)
    row = {"t": {"score": list(scores), "prediction": [""] * 200}}
    entry = {
        "matrix": [[0.0], [float(scores.mean())]],
        "items": [{"t": {"score": [0.0] * 200, "prediction": [""] * 200}}, row],
    }
    ours = ItemResampler({"tasks": ["t"], "methods": {"m": entry}}, draws=4000, seed=0).interval(
        "m", "final_average"
    )
    scipy_ci = bootstrap(
        (scores,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(0)
    )
    assert ours[0] == pytest.approx(scipy_ci.confidence_interval.low, abs=0.01)
    assert ours[1] == pytest.approx(scipy_ci.confidence_interval.high, abs=0.01)


def test_a_real_difference_is_resolved_and_a_null_one_is_not():
    rng = np.random.default_rng(7)
    keeper = _results(rng, n=200, general_rates=(0.7, 0.7, 0.68))
    forgetful = _results(rng, n=200, general_rates=(0.7, 0.5, 0.4))
    twin = _results(rng, n=200, general_rates=(0.7, 0.7, 0.68))
    for entry in (forgetful, twin):  # one shared base row, as in a run
        entry["items"][0], entry["matrix"][0], entry["general"][0] = (
            keeper["items"][0],
            keeper["matrix"][0],
            keeper["general"][0],
        )
    results = {
        "tasks": ["t1", "t2"],
        "general": ["g"],
        "methods": {"keeper": keeper, "forgetful": forgetful, "twin": twin},
    }
    sampler = ItemResampler(results, draws=1000, seed=0)
    resolved = sampler.difference("keeper", "forgetful", "retention")
    assert resolved["low"] > 0  # 0.68 vs 0.40 of 0.70: about +40 points
    null = sampler.difference("keeper", "twin", "retention")
    assert null["low"] < 0 < null["high"]
