"""The comparison report (xlearner/transfer/report.py)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from xlearner.transfer.report import (
    ReportRow,
    bar_chart,
    build_report,
    format_table,
    write_report,
)
from xlearner.transfer.results import (
    format_claims,
    format_differences,
    format_means,
    results_chart,
    summarize,
    write_results,
)


def rows() -> list[dict]:
    return [
        {
            "name": "random init",
            "cls": {"flowers": 30.0, "cars": 20.0},
            "det": {"voc": 5.0},
            "seg": {"voc": 20.25},
            "parameters": 11_200_000,
            "train_images": 0,
        },
        {
            "name": "xlearner",
            "cls": {"flowers": 64.0, "cars": 55.0},
            "det": {"voc": 22.4},
            "seg": {"voc": 42.0},
            "parameters": 11_200_000,
            "train_images": 60_000,
        },
        {
            "name": "xlearner w/o reconciliation",
            "cls": {"flowers": 61.0},
            "det": {"voc": 21.9},
            "parameters": 11_200_000,
            "train_images": 60_000,
        },
    ]


def table_cells(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]


def test_table_has_a_row_per_variant_and_the_paper_columns():
    report = build_report(rows())
    header, rule, *body = table_cells(format_table(report))
    assert header == [
        "Method",
        "AVG Cls",
        "flowers",
        "cars",
        "Det mAP (voc)",
        "Seg mIoU (voc)",
        "Params (M)",
        "Train images",
    ]
    assert all(set(cell) <= {"-", ":"} for cell in rule)
    assert [line[0] for line in body] == ["random init", "xlearner", "xlearner w/o reconciliation"]
    assert body[0][1:] == ["25.0", "30.0", "20.0", "5.0", "20.2", "11.20", "0"]
    assert body[1][1:] == ["59.5", "64.0", "55.0", "22.4", "42.0", "11.20", "60,000"]


def test_missing_values_render_as_dash():
    report = build_report(rows())
    last = table_cells(format_table(report))[-1]
    # no "cars" and no segmentation: those cells and the incomplete average are "-"
    assert last == ["xlearner w/o reconciliation", "-", "61.0", "-", "21.9", "-", "11.20", "60,000"]
    row = report["rows"][2]
    assert row["avg_cls"] is None and row["seg_miou"] is None and row["det_map"] == 21.9


def test_averages_are_computed_over_every_dataset_of_the_task():
    report = build_report(
        [
            {"name": "a", "cls": {"x": 10.0, "y": 20.0, "z": 60.0}, "det": {"p": 4.0, "q": 8.0}},
            {"name": "b", "cls": {"x": 50.0, "y": None, "z": 70.0}},
        ]
    )
    a, b = report["rows"]
    assert a["avg_cls"] == pytest.approx(30.0) and a["det_map"] == pytest.approx(6.0)
    assert b["avg_cls"] is None and b["det_map"] is None
    header = table_cells(format_table(report))[0]
    assert header[-4:] == ["Det mAP (q)", "Seg mIoU", "Params (M)", "Train images"]


def test_write_report_writes_json_md_and_a_valid_png(tmp_path):
    report = build_report(rows())
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "md", "png"}
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    markdown = paths["md"].read_text()
    assert format_table(report) in markdown
    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    with Image.open(paths["png"]) as image:
        image.verify()
    with Image.open(paths["png"]) as image:
        assert image.width > 400 and image.height > 300
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.json",
        "report.md",
        "report.png",
    ]


def test_write_report_without_any_complete_metric(tmp_path):
    report = build_report([{"name": "empty", "cls": {}, "parameters": None}])
    paths = write_report(report, tmp_path)
    assert table_cells(format_table(report))[-1] == ["empty", "-", "-", "-", "-", "-"]
    with Image.open(paths["png"]) as image:
        image.verify()


@pytest.mark.parametrize(
    ("bad_rows", "match"),
    [
        ([], "non-empty list"),
        ([{"name": ""}], "'name' must be a non-empty string"),
        ([{"name": "a"}, {"name": "a"}], r"row 1 \('a'\): duplicate name"),
        ([{"name": "a", "top1": 3}], r"unknown keys \['top1'\]"),
        ([{"name": "a", "cls": {"x": 0.5, "y": 101.0}}], r"cls\['y'\] must be a percentage"),
        ([{"name": "a", "det": [1.0]}], "'det' must be a dict"),
        ([{"name": "a", "parameters": -1}], "'parameters' must be a non-negative int"),
        ([{"name": "a", "train_images": 1.5}], "'train_images' must be a non-negative int"),
    ],
)
def test_bad_rows_raise_clear_errors(bad_rows, match):
    with pytest.raises(ValueError, match=match):
        build_report(bad_rows)


def test_write_report_rejects_a_raw_row_list(tmp_path):
    with pytest.raises(ValueError, match="not a report from build_report"):
        write_report({"rows": rows()}, tmp_path)


def test_rows_may_be_report_row_models():
    typed = [ReportRow.model_validate(row) for row in rows()]
    assert build_report(typed) == build_report(rows())
    with pytest.raises(ValueError, match=r"seg\['voc'\] must be a percentage"):
        ReportRow(name="a", seg={"voc": -1.0})


# results over seeds (xlearner/transfer/results.py) -------------------------------------
def seed_report(xlearner: float, hard: float, random: float) -> dict:
    return build_report(
        [
            {"name": "xlearner", "cls": {"a": xlearner, "b": xlearner + 2.0}, "parameters": 10},
            {"name": "hard_sharing", "cls": {"a": hard, "b": hard + 2.0}, "parameters": 10},
            {"name": "random_init", "cls": {"a": random, "b": random}, "train_images": 0},
        ]
    )


SEED_REPORTS = {0: seed_report(55.0, 52.0, 40.0), 1: seed_report(57.0, 53.0, 41.0),
                2: seed_report(56.0, 51.0, 39.0)}  # fmt: skip


def test_results_give_means_intervals_paired_differences_and_claims():
    results = summarize(SEED_REPORTS, main="xlearner")
    assert results["seeds"] == [0, 1, 2] and results["main"] == "xlearner"
    rows = {row["name"]: row for row in results["rows"]}
    avg = rows["xlearner"]["metrics"]["avg_cls"]  # 56, 58, 57 (AVG of a and a + 2)
    assert avg["mean"] == pytest.approx(57.0) and avg["seeds"] == [0, 1, 2]
    assert avg["high"] - avg["mean"] == pytest.approx(4.302653 / 3**0.5, abs=1e-5)  # sd 1
    assert rows["xlearner"]["metrics"]["cls:b"]["mean"] == pytest.approx(58.0)
    (diff,) = [d for d in results["differences"] if d["row"] == "hard_sharing"]
    # hard_sharing - xlearner per seed: -3, -4, -5
    assert diff["metric"] == "avg_cls" and diff["mean"] == pytest.approx(-4.0)
    assert diff["high"] == pytest.approx(-4.0 + 4.302653 / 3**0.5, abs=1e-5)
    claims = {c["claim"]: c for c in results["claims"]}
    assert claims["X-Learner > hard sharing"]["verdict"] == "holds"
    assert claims["X-Learner > hard sharing"]["difference"] == pytest.approx(4.0)
    assert set(results["reports"]) == {"0", "1", "2"}


def test_results_page_has_the_three_tables(tmp_path):
    results = summarize(SEED_REPORTS, main="xlearner")
    means = table_cells(format_means(results))
    assert means[0] == ["Method", "AVG Cls", "a", "b", "Params (M)", "Train images"]
    assert means[3][:2] == ["hard_sharing", "53.0 ± 2.5"]  # 52, 53, 51 + 1: sd 1
    claims = table_cells(format_claims(results))
    assert claims[0] == ["Claim", "Metric", "Difference", "95% interval", "Seeds", "Verdict"]
    # differences 3, 4, 5: half-width t(0.975, 2) * 1 / sqrt(3) = 2.48
    assert claims[2] == [
        "X-Learner > hard sharing",
        "AVG Cls",
        "+4.0",
        "[+1.5, +6.5]",
        "3",
        "holds",
    ]
    paths = write_results(results, tmp_path, preamble="# Results\n\n")
    page = paths["md"].read_text()
    assert page.startswith("# Results\n\n## Transfer over seeds")
    assert format_claims(results) in page and format_differences(results) in page
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
    with Image.open(paths["png"]) as image:
        image.verify()


def test_results_with_one_seed_show_means_without_intervals():
    results = summarize({3: SEED_REPORTS[0]}, main="xlearner")
    assert table_cells(format_means(results))[2][:2] == ["xlearner", "56.0"]
    assert all(c["verdict"] == "needs 2+ seeds" for c in results["claims"])


def test_results_reject_an_unknown_main_row():
    with pytest.raises(ValueError, match="main row 'prune' is not in the reports"):
        summarize(SEED_REPORTS, main="prune")


def test_bar_chart_draws_each_value_its_error_bar_and_a_dash_where_missing():
    figure = bar_chart(
        "t",
        ["xlearner", "prune"],
        {"AVG Cls": [56.0, None], "Seg mIoU": [40.0, 30.0]},
        errors={"AVG Cls": [2.5, 0.0], "Seg mIoU": [1.0, 0.5]},
    )
    (axes,) = figure.axes
    heights = sorted(round(bar.get_height(), 1) for bar in axes.patches)
    assert heights == [30.0, 40.0, 56.0]  # the missing value has no bar, but a dash
    assert [t.get_text() for t in axes.texts if t.get_text() == "-"] == ["-"]
    bars = [s for c in axes.collections for s in c.get_segments()]  # the error bars
    assert sorted(round(s[1][1] - s[0][1], 6) for s in bars) == [1.0, 2.0, 5.0]
    assert axes.get_ylim()[1] == pytest.approx((56.0 + 2.5) * 1.15)


def test_results_chart_shows_the_means_with_their_intervals():
    results = summarize(SEED_REPORTS, main="xlearner")
    (axes,) = results_chart(results).axes
    xlearner = next(r for r in results["rows"] if r["name"] == "xlearner")["metrics"]["avg_cls"]
    assert round(xlearner["mean"], 6) in {round(b.get_height(), 6) for b in axes.patches}
    assert "3 seed(s)" in axes.get_title()


def det_seed_report(xlearner: tuple[float, float], hard: tuple[float, float]) -> dict:
    """A report with a detection set: (COCO mAP, VOC AP50) per row."""
    return build_report(
        [
            {"name": "xlearner", "det": {"voc": xlearner[0]}, "ap50": {"voc": xlearner[1]}},
            {"name": "hard_sharing", "det": {"voc": hard[0]}, "ap50": {"voc": hard[1]}},
        ]
    )


def test_results_carry_ap50_beside_map_in_means_differences_and_claims():
    reports = {
        0: det_seed_report((20.0, 40.0), (19.0, 35.0)),
        1: det_seed_report((22.0, 43.0), (23.0, 37.0)),
        2: det_seed_report((21.0, 41.0), (20.0, 37.0)),
    }
    results = summarize(reports, main="xlearner")
    means = table_cells(format_means(results))
    assert means[0][2:4] == ["Det mAP (voc)", "Det AP50 (voc)"]
    assert means[2][:4] == ["xlearner", "-", "21.0 ± 2.5", "41.3 ± 3.8"]  # AP50 40, 43, 41
    differences = {(d["row"], d["metric"]): d for d in results["differences"]}
    assert differences["hard_sharing", "det_ap50"]["mean"] == pytest.approx(-5.0)  # -5 -6 -4
    claims = {(c["claim"], c["metric"]): c["verdict"] for c in results["claims"]}
    # mAP: +1, -1, +1 (within noise); AP50: +5, +6, +4 (holds)
    assert claims["X-Learner > hard sharing", "det_map"] == "within noise"
    assert claims["X-Learner > hard sharing", "det_ap50"] == "holds"
    assert "| X-Learner > hard sharing | Det AP50 |" in format_claims(results)
    # a run without AP50 has no AP50 column
    assert "AP50" not in format_means(summarize(SEED_REPORTS, main="xlearner"))
