"""The results of a run over several seeds: the page a user reads to decide.

``summarize(reports, main)`` takes one transfer report per seed (what the transfer stage
publishes, :func:`xlearner.transfer.report.build_report`) and gives:

- each row's mean and 95% t-interval over seeds, per summary metric and per data set;
- for every other row, its paired difference to the ``main`` row (paired by seed);
- the claims table (:mod:`xlearner.claims`): each of the paper's orderings with its
  measured difference, interval and verdict.

``write_results`` writes ``results.json``, ``results.md`` and ``results.png`` (the means
with their intervals as error bars). Scores are percentages; ``-``: not measured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure

from xlearner.claims import CLOSE_TOLERANCE, METRICS, evaluate_claims
from xlearner.integrity import verified_result
from xlearner.stats import CONFIDENCE, mean_interval, paired_difference
from xlearner.store import atomic_write, open_store
from xlearner.store_keys import RESULT, results_latest
from xlearner.transfer.report import MISSING, TASKS, bar_chart, check_report, markdown_table

RESULTS_FORMAT = "xlearner-results/1"
AP50 = "ap50"  # a report row's det dataset -> PASCAL VOC AP50
INDEX_FORMAT = "xlearner-results-index/1"


def _scores(reports: Mapping[int, dict]) -> tuple[list[str], dict, dict[str, list[str]]]:
    """Row names (in report order), row -> metric -> seed -> score, and the data sets."""
    names: list[str] = []
    datasets: dict[str, list[str]] = {task: [] for task in TASKS}
    scores: dict[str, dict[str, dict[int, float]]] = {}
    for seed, report in sorted(reports.items()):
        check_report(report)
        for task in TASKS:
            datasets[task] += [d for d in report["datasets"][task] if d not in datasets[task]]
        for row in report["rows"]:
            if row["name"] not in names:
                names.append(row["name"])
            per_metric = scores.setdefault(row["name"], {})
            measured = {key: row.get(key) for key in METRICS}
            for task in (*TASKS, AP50):
                measured |= {f"{task}:{d}": v for d, v in row.get(task, {}).items()}
            for metric, value in measured.items():
                if value is not None:
                    per_metric.setdefault(metric, {})[seed] = float(value)
    return names, scores, datasets


def _interval(values: Mapping[int, float], confidence: float) -> dict:
    return {**mean_interval(list(values.values()), confidence).as_dict(), "seeds": sorted(values)}


def summarize(reports: Mapping[int, dict], main: str, confidence: float = CONFIDENCE) -> dict:
    """Means, intervals, paired differences to ``main`` and claims over the seeds' reports."""
    if not reports:
        raise ValueError("summarize needs the report of at least one seed")
    names, scores, datasets = _scores(reports)
    if main not in scores:
        raise ValueError(f"main row {main!r} is not in the reports; rows: {names}")
    last = {row["name"]: row for report in reports.values() for row in report["rows"]}
    rows = [
        {
            "name": name,
            "parameters": last[name].get("parameters"),
            "train_images": last[name].get("train_images"),
            "metrics": {m: _interval(v, confidence) for m, v in scores[name].items()},
        }
        for name in names
    ]
    differences = []
    for name in names:
        if name == main:
            continue
        for metric in METRICS:
            row, reference = scores[name].get(metric, {}), scores[main].get(metric, {})
            if set(row) & set(reference):
                diff = paired_difference(row, reference, confidence)
                differences.append({"row": name, "metric": metric, **diff.as_dict()})
    return {
        "format": RESULTS_FORMAT,
        "main": main,
        "seeds": sorted(reports),
        "confidence": confidence,
        "datasets": datasets,
        "rows": rows,
        "differences": differences,
        "claims": evaluate_claims(scores, confidence=confidence),
        "reports": {str(seed): report for seed, report in sorted(reports.items())},
    }


def results_index(main: str, transfers: Mapping[int, str]) -> dict:
    """What a run leaves in the store for ``xlearner report``: its main row and the
    transfer stage output (URI) of every seed."""
    return {
        "format": INDEX_FORMAT,
        "main": main,
        "transfers": {str(seed): uri for seed, uri in sorted(transfers.items())},
    }


def results_from_store(store_uri: str, config_name: str, endpoint_url: str | None = None) -> dict:
    """The results of config ``config_name``'s last run in the store at ``store_uri``,
    rebuilt from the reports its transfer stages published (the pointer the run left:
    :func:`results_index`)."""
    store = open_store(store_uri, endpoint_url)
    key = results_latest(config_name)
    if not store.exists(key):
        raise ValueError(
            f"{store.uri(key)} does not exist: no run of config {config_name!r} finished in "
            "this store; run `xlearner run` with that config first"
        )
    index = store.read_json(key)
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{store.uri(key)}: not a results index ({INDEX_FORMAT!r})")
    reports = {}
    for seed, out in index["transfers"].items():
        output = open_store(out, endpoint_url)
        published = verified_result(output)  # its files checked against their sha256
        if published is None:
            raise ValueError(
                f"{output.uri(RESULT)} is missing: the transfer output of seed {seed} was "
                "deleted; rerun the pipeline"
            )
        reports[int(seed)] = published.dump()["report"]
    return summarize(reports, index["main"])


def check_results(results: dict) -> None:
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise ValueError(f"not results from summarize (expected format {RESULTS_FORMAT!r})")


def _mean_cell(interval: dict | None) -> str:
    """``mean ± half-width`` (just the mean for one seed), ``-`` when not measured."""
    if interval is None:
        return MISSING
    if interval["high"] is None:
        return f"{interval['mean']:.1f}"
    return f"{interval['mean']:.1f} ± {_half_width(interval):.1f}"


def _signed(value: float | None) -> str:
    return MISSING if value is None else f"{value:+.1f}"


def _range(entry: dict) -> str:
    if entry["low"] is None:
        return MISSING
    return f"[{entry['low']:+.1f}, {entry['high']:+.1f}]"


def format_means(results: dict) -> str:
    """One row per variant: mean ± half-width of the 95% interval over seeds."""
    check_results(results)
    datasets = results["datasets"]
    metrics = [("AVG Cls", "avg_cls")] + [(d, f"cls:{d}") for d in datasets["cls"]]
    per_dataset = [("det", "det", "det_map"), ("seg", "seg", "seg_miou")]  # key prefix, task
    if any(key.startswith(f"{AP50}:") for row in results["rows"] for key in row["metrics"]):
        per_dataset.insert(1, (AP50, "det", "det_ap50"))
    for prefix, task, summary in per_dataset:
        metrics += [(f"{METRICS[summary]} ({d})", f"{prefix}:{d}") for d in datasets[task]]
    header = ["Method", *(label for label, _ in metrics), "Params (M)", "Train images"]
    cells = [header]
    for row in results["rows"]:
        params, images = row["parameters"], row["train_images"]
        cells.append(
            [
                row["name"],
                *(_mean_cell(row["metrics"].get(key)) for _, key in metrics),
                MISSING if params is None else f"{params / 1e6:.2f}",
                MISSING if images is None else f"{images:,}",
            ]
        )
    return markdown_table(cells)


def format_differences(results: dict) -> str:
    """Every row's paired difference to the main row, per summary metric."""
    check_results(results)
    cells = [["Row", "Metric", "Difference", "95% interval", "Seeds"]]
    for entry in results["differences"]:
        cells.append(
            [
                entry["row"],
                METRICS[entry["metric"]],
                _signed(entry["mean"]),
                _range(entry),
                str(entry["n"]),
            ]
        )
    return markdown_table(cells)


def format_claims(results: dict) -> str:
    """The claims table: claim, metric, measured difference, interval, verdict."""
    check_results(results)
    cells = [["Claim", "Metric", "Difference", "95% interval", "Seeds", "Verdict"]]
    for claim in results["claims"]:
        cells.append(
            [
                claim["claim"],
                METRICS[claim["metric"]],
                _signed(claim["difference"]),
                _range(claim),
                str(claim["n"]),
                claim["verdict"],
            ]
        )
    return markdown_table(cells)


def results_markdown(results: dict) -> str:
    """The results page: means, paired differences, claims, and how to read them."""
    check_results(results)
    seeds = results["seeds"]
    confidence = round(100 * results["confidence"])
    notes = [
        f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)}); every variant trained once "
        "per seed in one store (ingest shared).",
        f"`mean ± h`: the mean over seeds and the half-width of its {confidence}% Student-t "
        "interval; one seed gives no interval.",
        f"Differences are paired by seed: row minus `{results['main']}` (a claim: the "
        f"better minus the worse row), mean over seeds with its {confidence}% t-interval.",
        "Verdicts: an ordering `holds` when its whole interval is above 0, is `reversed` "
        "when below 0, else `within noise`; a closeness claim `holds` when its interval "
        f"lies within ±{CLOSE_TOLERANCE:g} points, is `reversed` when entirely outside.",
        f"Scores in percent; `{MISSING}`: not measured.",
    ]
    return (
        "## Transfer over seeds\n\n"
        + format_means(results)
        + f"\n\n## Paired differences to {results['main']}\n\n"
        + format_differences(results)
        + "\n\n## The paper's claims\n\n"
        + format_claims(results)
        + "\n\n"
        + "\n".join(f"- {note}" for note in notes)
        + "\n"
    )


def _half_width(interval: dict | None) -> float:
    """The error bar of an interval: 0 when not measured or from one seed."""
    return (
        0.0 if interval is None or interval["high"] is None else interval["high"] - interval["mean"]
    )


def results_chart(results: dict) -> Figure:
    """Grouped bars of the summary means, their intervals as error bars."""
    rows = results["rows"]
    means: dict[str, list[float | None]] = {}
    errors: dict[str, list[float]] = {}
    for key in [key for key in METRICS if any(key in row["metrics"] for row in rows)]:
        intervals = [row["metrics"].get(key) for row in rows]
        means[METRICS[key]] = [None if i is None else i["mean"] for i in intervals]
        errors[METRICS[key]] = [_half_width(i) for i in intervals]
    return bar_chart(
        f"Transfer per variant: mean and {round(100 * results['confidence'])}% interval "
        f"over {len(results['seeds'])} seed(s)",
        [row["name"] for row in rows],
        means,
        errors=errors,
    )


def write_results(results: dict, out_dir: str | Path, preamble: str = "") -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` (``preamble`` first) and ``results.png``."""
    check_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"results.{kind}" for kind in ("json", "md", "png")}
    atomic_write(paths["json"], lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    atomic_write(paths["md"], lambda p: p.write_text(preamble + results_markdown(results)))
    figure = results_chart(results)
    atomic_write(paths["png"], lambda p: figure.savefig(p, format="png", dpi=120))
    return paths
