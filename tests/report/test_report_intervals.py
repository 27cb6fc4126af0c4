"""Reports of runs that kept their item outcomes: intervals in every table, the paired comparison
table, and the summary's one-line conclusions."""

from __future__ import annotations

import numpy as np

from forgetless.experiment.summary import conclusions, print_summary
from forgetless.report import with_metrics, write_report
from forgetless.report.tables import comparison_table, final_table, method_tables, summary_table


def _items(rng, n, rate):
    scores = (rng.random(n) < rate).astype(float)
    return {"score": list(scores), "prediction": ["x"] * n}


def _method(kind, rates, general_rates, base_items, rng, n=120):
    items = [base_items] + [
        {"t1": _items(rng, n, a), "t2": _items(rng, n, b), "g": _items(rng, n, g)}
        for (a, b), g in zip(rates, general_rates)
    ]
    mean = lambda row, k: float(np.mean(row[k]["score"]))  # noqa: E731
    return {
        "kind": kind,
        "stages": ["base", "t1", "t2"],
        "matrix": [[mean(r, "t1"), mean(r, "t2")] for r in items],
        "general": [[mean(r, "g")] for r in items],
        "items": items,
    }


def _results():
    rng = np.random.default_rng(0)
    base = {"t1": _items(rng, 120, 0.1), "t2": _items(rng, 120, 0.1), "g": _items(rng, 120, 0.8)}
    return {
        "run": {"name": "intervals"},
        "tasks": ["t1", "t2"],
        "general": ["g"],
        "methods": {
            "forgetful": _method("sequential_lora", [(0.9, 0.1), (0.5, 0.9)], [0.5, 0.4], base, rng),
            "keeper": _method("slim", [(0.9, 0.1), (0.8, 0.9)], [0.8, 0.78], base, rng),
        },
    }


def test_tables_show_n_and_intervals_and_the_paired_comparison():
    results = with_metrics(_results())
    summary = summary_table(results)
    assert summary.rows[0][2].count("[") == 1  # final AVE with its interval
    per_stage = method_tables(results)[0]
    assert per_stage.header[1] == "t1 (n=120)"
    value, bounds = per_stage.rows[1][1].split(" ", 1)
    low, high = (float(x) for x in bounds.strip("[]").split(", "))
    assert low <= float(value) <= high
    assert "[" in final_table(results).rows[0][1]  # the base row too
    comparison = comparison_table(results)
    assert comparison.title == "Paired comparison with forgetful"  # the sequential-LoRA method
    row = comparison.rows[0]
    assert row[0] == "keeper" and row[1].endswith("*")  # +38 points of retention, resolved
    assert float(row[-2]) < 1e-6  # McNemar on the general items


def test_summary_states_what_is_resolved(capsys):
    results = with_metrics(_results())
    (line,) = conclusions(results)
    assert line.startswith("keeper keeps ") and "forgetful" in line and line.endswith("(resolved)")
    print_summary(_results())  # computes the intervals itself
    assert "(resolved)" in capsys.readouterr().out


def test_a_run_without_items_reports_as_before(tmp_path):
    results = _results()
    for entry in results["methods"].values():
        del entry["items"]
    assert comparison_table(with_metrics(results)) is None
    assert conclusions(with_metrics(results)) == []
    report = write_report(results, tmp_path)
    assert "Paired comparison" not in (tmp_path / "tables.md").read_text()
    assert report.exists()


def test_the_conclusion_in_words_follows_the_intervals():
    from forgetless.experiment.summary import acquisition_line, verdicts

    results = with_metrics(_results())
    (line,) = verdicts(results)
    # keeper keeps 38 points more general ability (resolved); both learn t1 and t2 to 90% right
    # after their stage (no difference); keeper loses 10 points of t1, forgetful 40 (resolved)
    assert line.startswith("conclusion: keeper, against forgetful, keeps more general ability (+")
    assert "learns the new tasks about as well" in line and "forgets less of them" in line
    assert acquisition_line(results).startswith(
        "acquisition (each task right after its own stage, %): forgetful "
    )
