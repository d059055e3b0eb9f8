"""Orchestration overhead of one pipeline run: Prefect, MLflow, the store, process starts.

Runs the pipeline flow once (on a fresh store prefix, so every stage really runs) and
compares, per stage, the Prefect task's seconds with the stage's own compute seconds
(``seconds`` of its ``XLEARNER_RESULT`` line: the stage body, from config load to the
published result). For the whole run, the overhead is the part of the flow run's wall
time during which no stage was computing (stages run in parallel, so a plain sum of
stage seconds is not comparable with the wall time; it is printed too).

    python bench/overhead.py                                   # the quick start
    python bench/overhead.py --set tasks.cls.steps=20 --set compare=[]
    python bench/overhead.py --compare-cold        # also without warm start, side by side

Goal: overhead under 10 % of the wall time and under 2 s per stage. Uses the Prefect
server of PREFECT_API_URL, else Prefect's ephemeral one (its start-up is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

RESULT_LINE = re.compile(r"^\[(?P<label>[^\]]+)\] XLEARNER_RESULT (?P<result>\{.*\})$")
GOAL_PERCENT = 10.0
GOAL_STAGE_S = 2.0
LOG_PAGE = 200


@dataclass
class StageTiming:
    label: str  # the Prefect task's label, e.g. ``squeeze-xlearner`` or ``hard_sharing``
    stage: str  # the stage command it ran, e.g. ``squeeze`` or ``expand``
    task_s: float  # the Prefect task: process start to exit, log forwarding included
    compute_s: float  # the stage body inside its process
    finished: datetime  # when the stage printed its result

    @property
    def overhead_s(self) -> float:
        return self.task_s - self.compute_s


def union_seconds(intervals: list[tuple[datetime, datetime]]) -> float:
    """Length of the union of time intervals (parallel stages overlap)."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += (stop - start).total_seconds()
            end = stop
        elif stop > end:
            total += (stop - end).total_seconds()
            end = stop
    return total


def flow_run_records(flow_run_id: uuid.UUID) -> tuple[object, list, list]:
    """The flow run, its task runs and its logs, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=60)  # run logs are sent in batches
    logs: list = []
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        while page := client.read_logs(log_filter=log_filter, limit=LOG_PAGE, offset=len(logs)):
            logs += page
    return flow_run, task_runs, logs


def stage_timings(stage_seconds: dict[str, float], logs: list) -> list[StageTiming]:
    """Stages that ran, with their own seconds parsed from the forwarded result lines."""
    timings = []
    for log in logs:
        match = RESULT_LINE.match(log.message)
        if match and match["label"] in stage_seconds:
            result = json.loads(match["result"])
            label = match["label"]
            timings.append(
                StageTiming(
                    label,
                    result["stage"],
                    stage_seconds[label],
                    float(result["seconds"]),
                    log.timestamp,
                )
            )
    return sorted(timings, key=lambda t: t.finished)


def import_seconds(stages: set[str]) -> dict[str, float]:
    """Start-up of a fresh interpreter importing each stage module (the per-process floor)."""
    seconds = {}
    for stage in sorted(stages):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import stages.{stage}"], check=True)
        seconds[stage] = time.perf_counter() - t0
    return seconds


def report(cfg, result: dict, outer_wall_s: float, flow_run, task_runs: list, logs: list) -> dict:
    timings = stage_timings(result["stage_seconds"], logs)
    cached = sorted(set(result["stage_seconds"]) - {t.label for t in timings})
    wall_s = (flow_run.end_time - flow_run.start_time).total_seconds()
    busy = [(t.finished - timedelta(seconds=t.compute_s), t.finished) for t in timings]
    # generating the synthetic sources (quick start, first run) is work too, not overhead
    busy += [
        (r.start_time, r.end_time) for r in task_runs if r.task_key.startswith("synthesize_sources")
    ]
    busy_s = union_seconds(busy)
    overhead_s = wall_s - busy_s
    per_stage = [t.overhead_s for t in timings]
    summary = {
        "config": cfg.name,
        "store": cfg.store.uri,
        "wall_s": round(wall_s, 2),
        "wall_with_client_start_s": round(outer_wall_s, 2),
        "stage_compute_sum_s": round(sum(t.compute_s for t in timings), 2),
        "stage_task_sum_s": round(sum(t.task_s for t in timings), 2),
        "busy_s": round(busy_s, 2),
        "overhead_s": round(overhead_s, 2),
        "overhead_percent": round(100 * overhead_s / wall_s, 1),
        "stage_overhead_mean_s": round(sum(per_stage) / max(len(per_stage), 1), 2),
        "stage_overhead_max_s": round(max(per_stage, default=0.0), 2),
        "cached_stages": cached,
        "stages": [stage_row(t) for t in timings],
    }
    starts = import_seconds({t.stage for t in timings})
    for row in summary["stages"]:
        row["import_s"] = round(starts[row["stage"]], 2)
    summary["goal_met"] = (
        summary["overhead_percent"] < GOAL_PERCENT
        and summary["stage_overhead_max_s"] < GOAL_STAGE_S
    )
    return summary


def stage_row(t: StageTiming) -> dict:
    row = {**asdict(t), "finished": t.finished.isoformat(), "overhead_s": t.overhead_s}
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def print_summary(s: dict) -> None:
    header = ("stage", "task s", "compute s", "overhead s", "of it, import s")
    print("\n{:24s} {:>8s} {:>10s} {:>11s} {:>16s}".format(*header))
    for row in s["stages"]:
        values = (row["task_s"], row["compute_s"], row["overhead_s"], row["import_s"])
        print("{:24s} {:8.2f} {:10.2f} {:11.2f} {:16.2f}".format(row["label"], *values))
    print("(import s: a fresh interpreter importing the stage module, timed after the run)")
    if s["cached_stages"]:
        print(f"cached (not timed): {', '.join(s['cached_stages'])}")
    lines = [
        f"flow run wall: {s['wall_s']:.1f} s "
        f"(with the Prefect client's start: {s['wall_with_client_start_s']:.1f} s)",
        f"sum of stage compute: {s['stage_compute_sum_s']:.1f} s, "
        f"of stage tasks: {s['stage_task_sum_s']:.1f} s (stages overlap)",
        f"some stage computing: {s['busy_s']:.1f} s of the wall time",
        f"orchestration overhead: {s['overhead_s']:.1f} s = {s['overhead_percent']:.1f} % "
        f"of the wall time (goal < {GOAL_PERCENT:g} %)",
        f"per stage: mean {s['stage_overhead_mean_s']:.2f} s, "
        f"max {s['stage_overhead_max_s']:.2f} s (goal < {GOAL_STAGE_S:g} s)",
        f"goal {'met' if s['goal_met'] else 'MISSED'}",
    ]
    print("\n" + "\n".join(lines))


def measure(cfg) -> dict | None:
    """One pipeline run on ``cfg``, as ``xlearner run`` starts it; its summary (None: failed)."""
    from flows.pipeline import start_stage_interpreter, xlearner_pipeline

    mode = "warm start" if cfg.runner.warm_start else "a new interpreter per stage"
    print(f"running {cfg.name} ({mode}) with store {cfg.store.uri} ...", flush=True)
    t0 = time.perf_counter()
    start_stage_interpreter(cfg)
    state = xlearner_pipeline(config=cfg, return_state=True)
    outer_wall_s = time.perf_counter() - t0
    if not state.is_completed():
        print(f"the pipeline run ended {state.name}: {state.message}", file=sys.stderr)
        return None
    flow_run, task_runs, logs = flow_run_records(state.state_details.flow_run_id)
    summary = report(cfg, state.result(), outer_wall_s, flow_run, task_runs, logs)
    summary["warm_start"] = cfg.runner.warm_start
    print_summary(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml", help="pipeline config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--reuse-store",
        action="store_true",
        help="use store.uri as is (cached stages are not timed); default: a fresh prefix",
    )
    parser.add_argument(
        "--compare-cold",
        action="store_true",
        help="then run the same pipeline with runner.warm_start=false (fresh prefix too)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"
    )  # before Prefect loads
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from xlearner.config import ConfigError, load_config

    # Warm start first: its fork server's imports overlap Prefect's start, as in `xlearner run`.
    runs = [[], ["runner.warm_start=false"]] if args.compare_cold else [[]]
    try:
        base = load_config(args.config, args.overrides).store.uri.rstrip("/")
        configs = []
        for extra in runs:
            if not args.reuse_store:
                extra = [*extra, f"store.uri={base}/bench-{uuid.uuid4().hex[:8]}"]
            configs.append(load_config(args.config, [*args.overrides, *extra]))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    summaries = [measure(cfg) for cfg in configs]
    if None in summaries:
        return 1
    if args.compare_cold:
        warm, cold = summaries
        print(
            f"\nside by side: overhead {cold['overhead_s']:.1f} s "
            f"({cold['overhead_percent']:.1f} %) with a new interpreter per stage, "
            f"{warm['overhead_s']:.1f} s "
            f"({warm['overhead_percent']:.1f} %) with warm start; flow wall time "
            f"cold/warm = {cold['wall_s'] / warm['wall_s']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(summaries if args.compare_cold else summaries[0], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
