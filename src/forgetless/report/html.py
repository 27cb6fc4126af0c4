"""report.html: one self-contained page (plots inline as base64 PNG, tables, the run's config).

No script, no external stylesheet, font or image: the page renders offline, from an e-mail
attachment or a CI artifact, and a browser has nothing to fetch or fail on.
"""

from __future__ import annotations

import base64
import html
import json
from importlib.resources import files
from string import Template
from typing import Any

from forgetless.report.tables import all_tables, to_html


def image_tag(png: bytes, alt: str, element_id: str = "") -> str:
    """An <img> holding the PNG itself as a data URI."""
    data = base64.b64encode(png).decode("ascii")
    ident = f' id="{html.escape(element_id)}"' if element_id else ""
    return f'<img{ident} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def figure(png: bytes, caption: str, element_id: str = "") -> str:
    return f"<figure>{image_tag(png, caption, element_id)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def render_html(results: dict[str, Any], heatmaps: dict[str, bytes], summary_plots: dict[str, bytes]) -> str:
    """The report page for ``results`` (with metrics) and its plots ({caption: png})."""
    tables = all_tables(results)
    run = results.get("run") if isinstance(results.get("run"), dict) else {}
    name = str(run.get("name") or "run")
    meta = (
        f"model: {run.get('model', '?')} · tasks: {', '.join(results['tasks'])} · "
        f"methods: {', '.join(results['methods'])}"
    )
    template = Template(files("forgetless.report").joinpath("template.html").read_text(encoding="utf-8"))
    return template.substitute(
        title=html.escape(f"forgetless report: {name}"),
        meta=html.escape(meta),
        heatmaps="\n".join(
            figure(png, f"{method}: accuracy matrix R", f"heatmap-{index}")
            for index, (method, png) in enumerate(heatmaps.items())
        ),
        summary=to_html(tables[0]),
        summary_plots="\n".join(figure(png, caption) for caption, png in summary_plots.items()),
        tables="\n".join(to_html(table) for table in tables[1:]),
        config=html.escape(json.dumps(results.get("run", {}), indent=2, default=str)),
    )
