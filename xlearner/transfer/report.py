"""The comparison report: one row per variant or baseline, its transfer results.

``build_report(rows)`` validates the rows (:class:`ReportRow`) and adds the averages;
``write_report`` writes ``report.json``, ``report.md`` (a table like the paper's) and
``report.png`` (a grouped bar chart). Metrics are percentages (0-100); a value that was
not measured is ``None`` or absent and renders as ``-``.

A row: ``{"name": str, "cls": {dataset: top1}, "det": {dataset: mAP},
"seg": {dataset: mIoU}, "parameters": int, "train_images": int}``.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from statistics import fmean
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from xlearner.store import atomic_write

REPORT_FORMAT = "xlearner-report/1"
TASKS = ("cls", "det", "seg")
ROW_KEYS = {"name", *TASKS, "parameters", "train_images", "ap50", "eval_images"}
MISSING = "-"
# Summary metrics: report key -> label (table columns, chart legend).
SUMMARIES = {"avg_cls": "AVG Cls", "det_map": "Det mAP", "seg_miou": "Seg mIoU"}
SUMMARY_OF_TASK = {"cls": "avg_cls", "det": "det_map", "seg": "seg_miou"}


class ReportRow(BaseModel):
    """One variant or baseline: its transfer metrics (percent) per downstream data set."""

    model_config = ConfigDict(extra="forbid")

    name: str
    cls: dict[str, float | None] = Field(default_factory=dict)  # dataset -> linear-probe top-1
    det: dict[str, float | None] = Field(default_factory=dict)  # dataset -> box mAP
    seg: dict[str, float | None] = Field(default_factory=dict)  # dataset -> mIoU
    ap50: dict[str, float | None] = Field(default_factory=dict)  # det dataset -> VOC AP50
    # fine-tuned dataset -> [val images scored, val images]: less when transfer.eval_max_images cuts
    eval_images: dict[str, tuple[int, int]] = Field(default_factory=dict)
    parameters: int | None = None
    train_images: int | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("'name' must be a non-empty string")
        return value

    @field_validator(*TASKS, "ap50", mode="before")
    @classmethod
    def _metrics(cls, metrics: Any, info: ValidationInfo) -> dict[str, float | None]:
        task = info.field_name
        metrics = metrics or {}
        if not isinstance(metrics, dict):
            raise ValueError(f"{task!r} must be a dict dataset -> percent")
        checked: dict[str, float | None] = {}
        for dataset, value in metrics.items():
            if value is None:
                checked[dataset] = None
                continue
            if (
                not isinstance(dataset, str)
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and 0.0 <= value <= 100.0)
            ):
                raise ValueError(
                    f"{task}[{dataset!r}] must be a percentage in [0, 100] (or None); got {value!r}"
                )
            checked[dataset] = float(value)
        return checked

    @field_validator("eval_images", mode="before")
    @classmethod
    def _eval_images(cls, counts: Any) -> dict[str, tuple[int, int]]:
        counts = counts or {}
        if not isinstance(counts, dict) or not all(
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in v)
            and 0 <= v[0] <= v[1]
            for v in counts.values()
        ):
            raise ValueError(
                f"'eval_images' must map dataset -> [scored, val images]; got {counts!r}"
            )
        return {d: (v[0], v[1]) for d, v in counts.items()}

    @field_validator("parameters", "train_images", mode="before")
    @classmethod
    def _count(cls, value: Any, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{info.field_name!r} must be a non-negative int (or None); got {value!r}"
            )
        return value


def _row_error(index: int, row: dict, message: str) -> ValueError:
    name = row.get("name") if isinstance(row, dict) else None
    where = f"report row {index}" + (f" ({name!r})" if isinstance(name, str) else "")
    return ValueError(f"{where}: {message}")


def _first_problem(err: ValidationError) -> str:
    """The message of the first failed check (a validator's own words, without prefix)."""
    error = err.errors()[0]
    cause = (error.get("ctx") or {}).get("error")
    return str(cause) if isinstance(cause, ValueError) else error["msg"]


def _summary(values: dict[str, float | None], datasets: list[str]) -> float | None:
    """Mean over all of the report's data sets of a task; None when any is missing."""
    if not datasets or any(values.get(d) is None for d in datasets):
        return None
    return fmean(values[d] for d in datasets)


def build_report(rows: list[dict | ReportRow], protocol: dict[str, str] | None = None) -> dict:
    """Validate the rows and add per-task summaries (``avg_cls``, ``det_map``, ``seg_miou``).

    A summary averages over every data set of that task in the report, so it is only
    given (otherwise ``None``) for a row measured on all of them: an average over a
    different subset would not be comparable between rows. ``det_ap50`` averages the
    rows' ``ap50`` the same way. ``protocol``: how each task was measured, in words
    (``{"cls": "linear probe on C5"}``), for the notes under the table.
    """
    if not isinstance(rows, list) or not rows:
        raise ValueError("build_report needs a non-empty list of row dicts")
    checked = []
    for index, row in enumerate(rows):
        if isinstance(row, ReportRow):
            row = row.model_dump()
        if not isinstance(row, dict):
            raise ValueError(f"report row {index} must be a dict; got {type(row).__name__}")
        unknown = sorted(set(row) - ROW_KEYS)
        if unknown:
            raise _row_error(index, row, f"unknown keys {unknown}; allowed: {sorted(ROW_KEYS)}")
        try:
            valid = ReportRow.model_validate(row).model_dump()
        except ValidationError as err:
            raise _row_error(index, row, _first_problem(err)) from None
        if any(valid["name"] == other["name"] for other in checked):
            raise _row_error(
                index, row, f"duplicate name {valid['name']!r}: every row needs its own name"
            )
        checked.append(valid)
    datasets = {
        task: list(dict.fromkeys(d for row in checked for d in row[task])) for task in TASKS
    }
    for row in checked:
        for task in TASKS:
            row[SUMMARY_OF_TASK[task]] = _summary(row[task], datasets[task])
        row["det_ap50"] = _summary(row["ap50"], datasets["det"])
    report = {"format": REPORT_FORMAT, "datasets": datasets, "rows": checked}
    return report | ({"protocol": dict(protocol)} if protocol else {})


def check_report(report: dict) -> None:
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError(f"not a report from build_report (expected format {REPORT_FORMAT!r})")


def _cell(value: float | None, render: Callable[[float], str]) -> str:
    return MISSING if value is None else render(value)


def _percent(value: float | None) -> str:
    return _cell(value, "{:.1f}".format)


def _columns(report: dict) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, row -> cell text) for every table column."""
    datasets = report["datasets"]

    def metric(task: str, dataset: str) -> Callable[[dict], str]:
        return lambda row: _percent(row[task].get(dataset))

    columns = [
        ("Method", lambda row: row["name"]),
        ("AVG Cls", lambda row: _percent(row["avg_cls"])),
    ]
    columns += [(dataset, metric("cls", dataset)) for dataset in datasets["cls"]]
    for task in ("det", "seg"):
        label = SUMMARIES[SUMMARY_OF_TASK[task]]
        per_dataset = [(f"{label} ({d})", metric(task, d)) for d in datasets[task]]
        columns += per_dataset or [(label, lambda row: MISSING)]
        if task == "det" and any(row.get("ap50") for row in report["rows"]):
            columns += [(f"Det AP50 ({d})", metric("ap50", d)) for d in datasets["det"]]
    columns.append(("Params (M)", lambda row: _cell(row["parameters"], lambda n: f"{n / 1e6:.2f}")))
    columns.append(("Train images", lambda row: _cell(row["train_images"], "{:,}".format)))
    return columns


def format_table(report: dict) -> str:
    """The report as a markdown table, padded so it also reads as plain text."""
    check_report(report)
    columns = _columns(report)
    cells = [[header for header, _ in columns]]
    cells += [[cell(row) for _, cell in columns] for row in report["rows"]]
    return markdown_table(cells)


def markdown_table(cells: list[list[str]]) -> str:
    """Header + rows as a padded markdown table: the first column left-aligned, the
    others (numbers) right-aligned, also in the markdown rule."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]

    def line(values: list[str]) -> str:
        padded = [values[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(cells[0]), rule, *(line(values) for values in cells[1:])])


def _cuts(report: dict) -> dict[str, tuple[int, int]]:
    """Data sets scored on part of their val split: dataset -> (scored, val images)."""
    cuts: dict[str, tuple[int, int]] = {}
    for row in report["rows"]:
        for dataset, (scored, total) in row.get("eval_images", {}).items():
            if scored < total:
                cuts[dataset] = (scored, total)
    return cuts


def _markdown(report: dict) -> str:
    cls_sets = report["datasets"]["cls"]
    protocol = report.get("protocol", {})
    cls_protocol = protocol.get("cls", "linear-probe")
    notes = [
        f"AVG Cls: mean {cls_protocol} top-1 over the {len(cls_sets)} classification "
        "data set(s); Det: COCO-style box mAP; Seg: mIoU; all in percent.",
        f"`{MISSING}`: not measured (an average needs every data set of its task).",
    ]
    if any(row.get("ap50") for row in report["rows"]):
        interpolation = f", {protocol['ap50']}" if "ap50" in protocol else ""
        notes.append(
            f"Det AP50: the PASCAL VOC AP at IoU 0.5{interpolation}, difficult boxes left out."
        )
    notes += [
        f"{dataset}: scored on {scored:,} of its {total:,} val images (`transfer.eval_max_images`)."
        for dataset, (scored, total) in _cuts(report).items()
    ]
    return (
        "# Transfer comparison\n\n"
        + format_table(report)
        + "\n\n"
        + "\n".join(f"- {note}" for note in notes)
        + "\n"
    )


def bar_chart(
    title: str,
    groups: list[str],
    series: dict[str, list[float | None]],
    errors: dict[str, list[float]] | None = None,
) -> Figure:
    """Grouped bars: one group per name in ``groups``, one bar per ``series`` (its label ->
    one value per group; ``None``: not measured, drawn as ``-``), each labelled with its
    value; ``errors``: the half-widths of the same series, drawn as error bars."""
    figure = Figure(figsize=(max(6.5, 1.3 * len(groups) + 2.5), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    positions = range(len(groups))
    axes.set_xticks(
        list(positions), [textwrap.fill(name, 14, break_long_words=False) for name in groups]
    )
    axes.set_ylabel("score (%)")
    if not series:
        axes.text(0.5, 0.5, "no complete metric to plot", ha="center", transform=axes.transAxes)
        return figure
    width = 0.8 / len(series)
    top = 1.0
    for k, (label, values) in enumerate(series.items()):
        offsets = [p + (k - (len(series) - 1) / 2) * width for p in positions]
        spread = (errors or {}).get(label, [0.0] * len(values))
        drawn = [
            (x, v, e) for x, v, e in zip(offsets, values, spread, strict=True) if v is not None
        ]
        bars = axes.bar(
            [x for x, _, _ in drawn],
            [v for _, v, _ in drawn],
            width * 0.95,
            yerr=[e for _, _, e in drawn] if errors else None,
            capsize=3 if errors else 0,
            label=label,
        )
        axes.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
        top = max([top, *(v + e for _, v, e in drawn)])
        for x, value in zip(offsets, values, strict=True):
            if value is None:
                axes.text(x, 0, MISSING, ha="center", va="bottom", color="0.4", fontsize=11)
    axes.set_ylim(0, top * 1.15)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return figure


def _chart(report: dict) -> Figure:
    """One group per row, one bar per summary metric that any row has."""
    rows = report["rows"]
    metrics = [key for key in SUMMARIES if any(row[key] is not None for row in rows)]
    cls_sets = len(report["datasets"]["cls"])
    return bar_chart(
        f"Transfer evaluation per variant (AVG Cls over {cls_sets} classification sets)",
        [row["name"] for row in rows],
        {SUMMARIES[key]: [row[key] for row in rows] for key in metrics},
    )


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into the folder ``out_dir``."""
    check_report(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"report.{kind}" for kind in ("json", "md", "png")}
    atomic_write(paths["json"], lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(paths["md"], lambda p: p.write_text(_markdown(report)))
    figure = _chart(report)
    atomic_write(paths["png"], lambda p: figure.savefig(p, format="png", dpi=120))
    return paths
