"""Paper-shaped tables (Tables 1-5 of the collaborative-knowledge paper) as data, Markdown and HTML.

Per method, new knowledge: rows ``base``, ``METHOD 1``, ``METHOD 1,2``, ``METHOD 1-3`` ... (after
each stage), columns the tasks and ``AVE``, then a ``gain base`` row (relative change of the
last row over the base, in %) and a ``BWT`` row (the paper's relative backward transfer, in %).
Per method, general ability: the same rows over the general-suite columns. One summary table
compares the methods; one final table lists every method's last row (the paper's Table 5).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from forgetless.report.schema import stage_labels


@dataclass
class Table:
    """A titled table of already formatted cells."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    emphasis: set[int] = field(default_factory=set)  # row indices shown in bold (gain / BWT rows)


def score(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:+.{digits}f}%"


def interval(value: float | None, bounds: list[float] | None, kind: str = "score") -> str:
    """A value with its 95% interval: ``0.527 [0.491, 0.563]`` (score), ``-45.0% [-60.1, -30.2]``
    (percent), ``+0.041 [+0.012, +0.070]`` (signed); the plain value when there is no interval."""
    if value is None:
        return "–"
    if kind == "percent":
        plain = percent(value)
        return plain if not bounds else f"{plain} [{100 * bounds[0]:+.1f}, {100 * bounds[1]:+.1f}]"
    if kind == "share":
        plain = f"{100 * value:.1f}%"
        return plain if not bounds else f"{plain} [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"
    if kind == "signed":
        return f"{value:+.4f}" if not bounds else f"{value:+.3f} [{bounds[0]:+.3f}, {bounds[1]:+.3f}]"
    return score(value) if not bounds else f"{value:.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _span(stage: int) -> str:
    """Paper row names: 1, 1,2, 1-3, 1-4 ..."""
    return {1: "1", 2: "1,2"}.get(stage, f"1-{stage}")


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _matrix_table(
    method: str, entry: dict[str, Any], columns: list[str], matrix: list[list[Any]], title: str, bwt: bool
) -> Table:
    metrics = entry["metrics"]
    labels = stage_labels(entry)
    known = entry.get("uncertainty") or {}
    cells = (known.get("cells") or {}).get("matrix" if bwt else "general")
    averages = (known.get("per_stage") or {}).get("average_per_stage" if bwt else "general_average_per_stage")
    rows = []
    for index, values in enumerate(matrix):
        name = "base" if index == 0 else f"{method} {_span(index)}"
        shown = [interval(v, cells[index][j] if cells else None) for j, v in enumerate(values)]
        rows.append([name, *shown, interval(_mean(values), averages[index] if averages else None)])
    if known.get("n"):
        columns = [f"{c} (n={known['n'][c]})" if c in known["n"] else c for c in columns]
    prefix = "general_" if not bwt else ""
    gains = metrics[f"{prefix}gain_from_base"]
    rows.append(["gain base", *[percent(g, 2) for g in gains], percent(metrics[f"{prefix}gain_average"], 1)])
    emphasis = {len(rows) - 1}
    if bwt:
        rows.append(["BWT", *[percent(b, 1) if b is not None else "" for b in metrics["bwt_per_task"]], ""])
        emphasis.add(len(rows) - 1)
    order = ", ".join(f"{i} = {label}" for i, label in enumerate(labels) if i > 0)
    note = f"stages: {order}" if order else ""
    if any(v is None for values in matrix for v in values):  # evaluation.unseen_tasks / general_stages
        note += "; –: not scored after that stage (AVE: mean of the scored cells)"
    return Table(title, ["", *columns, "AVE"], rows, note=note, emphasis=emphasis)


def method_tables(results: dict[str, Any]) -> list[Table]:
    """Per method: the new-knowledge table, and the general-ability table when there is a suite."""
    tables = []
    for method, entry in results["methods"].items():
        tables.append(
            _matrix_table(
                method, entry, results["tasks"], entry["matrix"], f"{method}: new knowledge per stage", True
            )
        )
        if results.get("general") and entry.get("general"):
            tables.append(
                _matrix_table(
                    method,
                    entry,
                    results["general"],
                    entry["general"],
                    f"{method}: general ability per stage",
                    False,
                )
            )
    return tables


def summary_table(results: dict[str, Any]) -> Table:
    """One row per method: acquisition, final average, BWT (relative, absolute), FWT, gains, retention."""
    header = [
        "method",
        "acquisition",
        "final AVE",
        "BWT",
        "BWT (abs)",
        "FWT",
        "gain base",
        "general",
        "retention",
    ]
    rows = []
    for method, entry in results["methods"].items():
        m = entry["metrics"]
        bounds = (entry.get("uncertainty") or {}).get("metrics") or {}
        general_last = m.get("general_average_per_stage", [None])[-1]
        rows.append(
            [
                method,
                interval(m["acquisition_average"], bounds.get("acquisition_average")),
                interval(m["final_average"], bounds.get("final_average")),
                interval(m["bwt"], bounds.get("bwt"), "percent"),
                interval(m["bwt_absolute"], bounds.get("bwt_absolute"), "signed"),
                interval(m["fwt"], bounds.get("fwt"), "signed"),
                percent(m["gain_average"]),
                interval(general_last, bounds.get("general_final_average")),
                interval(m.get("retention"), bounds.get("retention"), "share"),
            ]
        )
    note = (
        "acquisition: mean of R[s_j][j] (score right after learning task j); BWT: mean relative change "
        "from then to the end; BWT (abs): the same as a difference; FWT: R[s_j-1][j] - R[0][j]; "
        "gain base: relative change of the final AVE over the base; general: mean general-suite score "
        "after the last stage; retention: that over the base's. Brackets: 95% intervals (stratified "
        "bootstrap over each task's items, 2,000 draws, seed 0) where the run kept its item outcomes."
    )
    return Table("Summary: every method after its last stage", header, rows, note=note)


def final_table(results: dict[str, Any]) -> Table:
    """The paper's Table 5: the base and every method's last row, tasks and general columns."""
    general = results.get("general") or []
    header = ["", *results["tasks"], "AVnew", *general, *(["AVgen"] if general else [])]
    first = next(iter(results["methods"].values()))

    def row(name: str, tasks: list, gen: list | None, entry: dict[str, Any], at: int) -> list[str]:
        known = (entry.get("uncertainty") or {}).get("cells") or {}
        task_cells = known.get("matrix", [None] * len(entry["matrix"]))[at] or [None] * len(tasks)
        cells = [name, *[interval(v, b) for v, b in zip(tasks, task_cells)], score(_mean(tasks))]
        if general:
            gen = gen or [None] * len(general)
            general_cells = (known.get("general") or [[None] * len(general)] * len(entry["matrix"]))[at]
            cells += [*[interval(v, b) for v, b in zip(gen, general_cells)], score(_mean(gen))]
        return cells

    rows = [row("base", first["matrix"][0], (first.get("general") or [None])[0], first, 0)]
    for method, entry in results["methods"].items():
        rows.append(row(method, entry["matrix"][-1], (entry.get("general") or [None])[-1], entry, -1))
    return Table("Final scores: base and every method after its last stage", header, rows)


COMPARED = (
    ("retention", "retention", "share"),
    ("general_final_average", "general", "signed"),
    ("final_average", "final AVE", "signed"),
    ("acquisition_average", "acquisition", "signed"),
    ("bwt_absolute", "BWT (abs)", "signed"),
)


def comparison_table(results: dict[str, Any]) -> Table | None:
    """Every method minus the reference method on the same items: the difference of each metric
    with its paired 95% interval (``*``: the interval excludes 0), and exact McNemar p-values of
    the final stage's binary items (general suite, new tasks)."""
    rows, reference = [], None
    for method, entry in results["methods"].items():
        known = entry.get("uncertainty") or {}
        reference = reference or known.get("reference")
        versus = known.get("vs_reference")
        if not versus:
            continue
        cells = [method]
        for metric, _, kind in COMPARED:
            found = versus.get(metric)
            if found is None:
                cells.append("–")
                continue
            shown = kind if kind != "share" else "signed_share"
            text = _difference(found, shown)
            cells.append(text + (" *" if found["low"] > 0 or found["high"] < 0 else ""))
        tests = known.get("mcnemar") or {}
        cells += ["–" if tests.get(k) is None else f"{tests[k]:.2g}" for k in ("general", "tasks")]
        rows.append(cells)
    if not rows:
        return None
    header = [
        "method",
        *[f"Δ {label}" for _, label, _ in COMPARED],
        "McNemar p (general)",
        "McNemar p (tasks)",
    ]
    note = (
        f"method minus {reference} on the same items after the last stage; brackets: 95% paired "
        "bootstrap interval (items resampled within each task, the same draw for both methods); "
        "*: the interval excludes 0. McNemar: exact test on the pooled binary items."
    )
    return Table(f"Paired comparison with {reference}", header, rows, note=note)


def _difference(found: dict[str, float], kind: str) -> str:
    if kind == "signed_share":
        d, low, high = (100 * found[k] for k in ("difference", "low", "high"))
        return f"{d:+.1f} pts [{low:+.1f}, {high:+.1f}]"
    return interval(found["difference"], [found["low"], found["high"]], "signed")


def all_tables(results: dict[str, Any]) -> list[Table]:
    comparison = comparison_table(results)
    return [
        summary_table(results),
        *([comparison] if comparison else []),
        final_table(results),
        *method_tables(results),
    ]


def to_markdown(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    out = [f"### {table.title}", "", line(table.header), line(["---"] * len(table.header))]
    for index, cells in enumerate(table.rows):
        out.append(line([f"**{c}**" if index in table.emphasis and c else c for c in cells]))
    if table.note:
        out += ["", f"_{table.note}_"]
    return "\n".join(out) + "\n"


def to_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.header)
    body = []
    for index, cells in enumerate(table.rows):
        css = ' class="emphasis"' if index in table.emphasis else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return (
        f"<h3>{html.escape(table.title)}</h3>\n<table>\n<thead><tr>{head}</tr></thead>\n"
        f"<tbody>\n{chr(10).join(body)}\n</tbody>\n</table>\n{note}\n"
    )


def markdown_report(results: dict[str, Any]) -> str:
    """tables.md: every table, summary first."""
    name = results.get("run", {}).get("name", "run") if isinstance(results.get("run"), dict) else "run"
    parts = [f"# forgetless results: {name}\n", "Scores in [0, 1]; gain and BWT in percent.\n"]
    parts += [to_markdown(table) for table in all_tables(results)]
    return "\n".join(parts)
