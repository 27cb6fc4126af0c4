"""Schema validation, paper-shaped tables, plots and the written report files."""

from __future__ import annotations

import io
import json
import re

import pytest

from forgetless.errors import InputError
from forgetless.report import compute_metrics, load_results, validate_results, write_report
from forgetless.report.plots import acquisition_retention, general_per_stage, heatmap
from forgetless.report.schema import stage_labels, with_metrics
from forgetless.report.tables import final_table, markdown_report, method_tables, summary_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compute_metrics_reads_the_entry(results):
    metrics = compute_metrics(results["methods"]["sequential_lora"])
    assert metrics["acquisition"] == [1.0, 1.0, 1.0]
    assert metrics["bwt_per_task"] == pytest.approx([-0.6, -0.3, None])
    assert metrics["retention"] == pytest.approx(0.425 / 0.55)
    joint = compute_metrics(results["methods"]["joint"])
    assert joint["learned_at"] == [1, 1, 1] and joint["bwt"] is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("tasks"), "'tasks' must be a list"),
        (lambda r: r["methods"].clear(), "'methods' is empty"),
        (lambda r: r["methods"]["joint"]["matrix"][1].pop(), "methods.joint.matrix row 1 must list 3 scores"),
        (lambda r: r["methods"]["joint"]["general"].pop(), "methods.joint.general has 1 rows; expected 2"),
        (
            lambda r: r["methods"]["joint"]["matrix"][0].__setitem__(0, "high"),
            "scores must be numbers or null",
        ),
        (
            lambda r: r["methods"]["joint"].__setitem__("stages", ["a", "b", "c"]),
            "3 labels for 2 matrix rows",
        ),
        (lambda r: r["methods"]["joint"].__setitem__("learned_at", [1, 2, 1]), "learned_at"),
    ],
)
def test_schema_errors_name_the_field(results, edit, message):
    edit(results)
    with pytest.raises(InputError, match=re.escape(message)):
        validate_results(results)


def test_load_results_from_folder_and_file(results, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert load_results(tmp_path)["tasks"] == results["tasks"]
    assert load_results(tmp_path / "results.json")["tasks"] == results["tasks"]
    with pytest.raises(InputError, match="does not exist"):
        load_results(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_results(tmp_path / "bad.json")


def test_stage_labels_with_and_without_base(results):
    assert stage_labels(results["methods"]["sequential_lora"]) == ["base", "facts", "topics", "dates"]
    assert stage_labels(results["methods"]["joint"]) == ["base", "all"]
    assert stage_labels({"matrix": [[0.1], [0.2]]}) == ["base", "stage 1"]


def test_method_table_has_the_paper_shape(results):
    full = with_metrics(results)
    new_knowledge, general, *_ = method_tables(full)
    assert new_knowledge.header == ["", "facts", "topics", "dates", "AVE"]
    assert [row[0] for row in new_knowledge.rows] == [
        "base", "sequential_lora 1", "sequential_lora 1,2", "sequential_lora 1-3", "gain base", "BWT",
    ]  # fmt: skip
    assert new_knowledge.rows[3] == ["sequential_lora 1-3", "0.4000", "0.7000", "1.0000", "0.7000"]
    # gain: base 0 -> undefined; topics (0.7 - 0.25) / 0.25 = +180%; AVE (0.7 - 0.0833) / 0.0833 = +740%
    assert new_knowledge.rows[4] == ["gain base", "–", "+180.00%", "–", "+740.0%"]
    # BWT: (0.4 - 1.0) / 1.0 = -60%, (0.7 - 1.0) / 1.0 = -30%, none for the last task
    assert new_knowledge.rows[5] == ["BWT", "-60.0%", "-30.0%", "", ""]
    assert general.header == ["", "arithmetic", "capitals", "AVE"]
    assert general.rows[-1] == ["gain base", "-30.00%", "-16.67%", "-22.7%"]


def test_summary_and_final_tables(results):
    full = with_metrics(results)
    summary = summary_table(full)
    assert summary.rows[0][:4] == ["sequential_lora", "1.0000", "0.7000", "-45.0%"]
    assert summary.rows[1][3] == "–"  # one stage: no backward transfer
    final = final_table(full)
    assert final.header[-1] == "AVgen" and [r[0] for r in final.rows] == ["base", "sequential_lora", "joint"]
    assert final.rows[2][1:5] == ["0.8000", "0.9000", "0.8500", "0.8500"]
    text = markdown_report(full)
    assert "| **BWT** | **-60.0%** | **-30.0%** |" in text and text.startswith("# forgetless results: demo")


def test_plots_are_png_with_the_heatmap_colours(results):
    import matplotlib.image

    full = with_metrics(results)
    png = heatmap("sequential_lora", full["methods"]["sequential_lora"], full["tasks"])
    assert png.startswith(PNG_MAGIC)
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    # cells of 1.0 and 0.0 show viridis' two ends
    yellow = (abs(pixels - [253 / 255, 231 / 255, 37 / 255]) < 0.05).all(-1).sum()
    purple = (abs(pixels - [68 / 255, 1 / 255, 84 / 255]) < 0.05).all(-1).sum()
    assert yellow > 500 and purple > 500
    assert acquisition_retention(full).startswith(PNG_MAGIC)
    assert general_per_stage(full).startswith(PNG_MAGIC)
    assert general_per_stage({**full, "general": []}) is None
    assert heatmap("x", full["methods"]["joint"], full["tasks"]) == heatmap(
        "x", full["methods"]["joint"], full["tasks"]
    )


def test_write_report_writes_every_artifact(results, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(results))
    report = write_report(tmp_path)
    assert report == tmp_path / "report.html"
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["acquisition_retention.png", "general_per_stage.png", "heatmap_joint.png",
                     "heatmap_sequential_lora.png"]  # fmt: skip
    rewritten = json.loads((tmp_path / "results.json").read_text())
    assert rewritten["methods"]["joint"]["metrics"]["final_average"] == pytest.approx(0.85)
    assert "### sequential_lora: new knowledge per stage" in (tmp_path / "tables.md").read_text()
    page = report.read_text()
    # self-contained: every image inline, nothing fetched from anywhere
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.search(r"""(src|href)=["'](?!data:)""", page) and "<script" not in page
    assert "&quot;model&quot;: &quot;tiny-llama&quot;" in page  # the run's config, escaped


def test_write_report_needs_out_dir_for_a_dict(results, tmp_path):
    with pytest.raises(InputError, match="out_dir"):
        write_report(results)
    assert write_report(results, tmp_path / "out").exists()
