"""report.html in real headless Chromium: it renders, logs no console error, and shows the heatmap."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from forgetless.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian chromium (scripts/setup.sh --test installs it)"
)

VIRIDIS_HIGH = (253, 231, 37)  # the colour of a 1.0 cell
VIRIDIS_LOW = (68, 1, 84)  # the colour of a 0.0 cell


def screenshot(page, out, profile):
    """Screenshot ``page`` into ``out``; returns Chromium's console messages (CONSOLE log lines)."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--window-size=1280,1000",
        "--virtual-time-budget=5000", f"--screenshot={out}", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert out.exists(), f"chromium wrote no screenshot: {done.stderr[-2000:]}"
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def colour_pixels(png, colour, tolerance=10):
    import matplotlib.image

    pixels = (matplotlib.image.imread(png)[..., :3] * 255).round()
    return int((abs(pixels - colour) <= tolerance).all(-1).sum())


def test_report_renders_in_chromium(results, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    report = write_report(tmp_path / "run")

    console = screenshot(report, tmp_path / "report.png", tmp_path / "profile1")
    assert console == []
    high, low = (
        colour_pixels(tmp_path / "report.png", VIRIDIS_HIGH),
        colour_pixels(tmp_path / "report.png", VIRIDIS_LOW),
    )
    assert high > 2000 and low > 2000, (high, low)

    # the same page without its heatmaps has none of those colours: the check above sees the heatmap
    page = report.read_text()
    start, end = page.index('<div class="plots" id="heatmaps">'), page.index("<h2>Summary</h2>")
    bare = tmp_path / "bare.html"
    bare.write_text(page[:start] + page[end:])
    screenshot(bare, tmp_path / "bare.png", tmp_path / "profile2")
    assert colour_pixels(tmp_path / "bare.png", VIRIDIS_HIGH) < high / 20

    # and the console check does catch errors: a page with a failing script and a missing image
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<html><body><img src="missing.png"><script>undefinedFunction();</script></body></html>'
    )
    messages = screenshot(broken, tmp_path / "broken.png", tmp_path / "profile3")
    assert any("undefinedFunction" in line for line in messages)
