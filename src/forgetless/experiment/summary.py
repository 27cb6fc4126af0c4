"""The final terminal table of a run: one row per method, what a reader needs at a glance."""

from __future__ import annotations

from typing import Any


def summary_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """Per method: final score on each task, final average, BWT, general score vs base."""
    rows = []
    tasks = results["tasks"]
    for name, entry in results["methods"].items():
        final = entry["matrix"][-1]
        metrics = entry.get("metrics", {})
        general = entry["general"]
        base_general = sum(general[0]) / max(len(general[0]), 1)
        last_general = sum(general[-1]) / max(len(general[-1]), 1)
        row = {"method": name}
        row.update({task: f"{100 * score:.1f}" for task, score in zip(tasks, final)})
        row["AVE"] = f"{100 * sum(final) / len(final):.1f}"
        bwt = metrics.get("bwt_absolute")
        row["BWT"] = "-" if bwt is None else f"{100 * bwt:+.1f}"
        row["general"] = f"{100 * last_general:.1f} ({100 * (last_general - base_general):+.1f})"
        rows.append(row)
    return rows


def _share(value: float, bounds: list[float] | None) -> str:
    return f"{100 * value:.1f}%" + (f" [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]" if bounds else "")


def _difference(found: dict[str, float]) -> str:
    """A paired difference and its 95% interval, in points."""
    return f"{100 * found['difference']:+.1f} points [{100 * found['low']:+.1f}, {100 * found['high']:+.1f}]"


def _resolved(found: dict[str, float]) -> int:
    """+1 / -1 when the interval lies above / below 0, 0 when it includes 0."""
    return 1 if found["low"] > 0 else -1 if found["high"] < 0 else 0


def conclusions(results: dict[str, Any]) -> list[str]:
    """One line per method compared with the reference: how much general ability each keeps, the
    paired difference with its 95% interval, and whether the interval resolves it."""
    lines = []
    methods = results["methods"]
    for name, entry in methods.items():
        known = entry.get("uncertainty") or {}
        versus = (known.get("vs_reference") or {}).get("retention")
        reference = known.get("reference")
        if versus is None or reference not in methods:
            continue
        ours, theirs = entry["metrics"]["retention"], methods[reference]["metrics"]["retention"]
        bounds = (known.get("metrics") or {}).get("retention")
        reference_bounds = ((methods[reference].get("uncertainty") or {}).get("metrics") or {}).get(
            "retention"
        )
        verdict = "resolved" if _resolved(versus) else "not resolved: the interval includes 0"
        lines.append(
            f"{name} keeps {_share(ours, bounds)} of general ability, {reference} {_share(theirs, reference_bounds)}; "
            f"difference {_difference(versus)} ({verdict})"
        )
    return lines


# what the paired comparison says of each metric, in words: (metric, higher, lower, neither)
_CLAUSES = (
    ("retention", "keeps more general ability", "keeps less general ability", "keeps as much general ability"),
    ("acquisition_average", "learns the new tasks better", "learns the new tasks less well",
     "learns the new tasks about as well"),
    ("bwt_absolute", "forgets less of them", "forgets more of them", "forgets about as much of them"),
)  # fmt: skip


def verdicts(results: dict[str, Any]) -> list[str]:
    """The conclusion in words, one line per method compared with the reference: each clause is
    backed by the paired 95% interval, and one that includes 0 says "about as" (not resolved)."""
    lines = []
    for name, entry in results["methods"].items():
        known = entry.get("uncertainty") or {}
        versus, reference = known.get("vs_reference") or {}, known.get("reference")
        clauses = []
        for metric, higher, lower, neither in _CLAUSES:
            found = versus.get(metric)
            if found is not None:
                words = {1: higher, -1: lower, 0: neither}[_resolved(found)]
                clauses.append(f"{words} ({_difference(found)})")
        if clauses:
            lines.append(f"conclusion: {name}, against {reference}, " + "; ".join(clauses))
    return lines


def acquisition_line(results: dict[str, Any]) -> str:
    """Each method's score on every task right after the stage that learned it."""
    parts = []
    for name, entry in results["methods"].items():
        scores = [a for a in entry["metrics"].get("acquisition", []) if a is not None]
        if scores:
            parts.append(f"{name} " + " / ".join(f"{100 * a:.0f}" for a in scores))
    return "acquisition (each task right after its own stage, %): " + ", ".join(parts) if parts else ""


def print_summary(results: dict[str, Any], report_path: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from forgetless.report import with_metrics

    if not any("uncertainty" in entry for entry in results["methods"].values()):
        results = with_metrics(results)  # intervals, where the run kept its item outcomes
    rows = summary_rows(results)
    if not rows:
        return
    base = results["methods"][next(iter(results["methods"]))]
    table = Table(title=f"{results['run'].get('name', 'run')}: after the last stage (scores in %)")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    base_row = {"method": "base"}
    base_row.update({task: f"{100 * score:.1f}" for task, score in zip(results["tasks"], base["matrix"][0])})
    base_row["AVE"] = f"{100 * sum(base['matrix'][0]) / len(base['matrix'][0]):.1f}"
    base_row["BWT"] = "-"
    base_general = sum(base["general"][0]) / max(len(base["general"][0]), 1)
    base_row["general"] = f"{100 * base_general:.1f}"
    for row in [base_row, *rows]:
        table.add_row(*[row[column] for column in rows[0]])
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(
        "BWT: mean over earlier tasks of (final - just learned), in points; general: mean of the general suite (change vs base)"
    )
    for line in [acquisition_line(results), *conclusions(results), *verdicts(results)]:
        if line:
            console.print(line, highlight=False)
    if report_path:
        console.print(f"report: {report_path}")
