"""The paper's claims (METHOD.md), checked against a multi-seed run.

Each claim compares two report rows on a summary metric by the paired difference of
their scores over seeds (:func:`xlearner.stats.paired_difference`):

- an **ordering** ("X-Learner > hard sharing"): ``holds`` when the whole interval of
  ``better - worse`` is above 0, ``reversed`` when it is below 0, else ``within noise``;
- a **closeness** ("pruning close to distillation"): ``holds`` when the whole interval
  lies within +-``tolerance`` points, ``reversed`` when it lies entirely outside that band
  (clearly not close), else ``within noise``.

With one seed there is no interval: the verdict is ``needs 2+ seeds``. A claim is listed
only for the rows the run has; "any pre-training > random" becomes one claim per
trained row against the random backbone, and each ``without:<task or source>`` row one
claim that the left-out task or source helps (X-Learner above the row without it: the
paper's "additional sources" observation, and what a source trigger's retraining asks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from xlearner.config.pipeline import WITHOUT, Variant
from xlearner.stats import CONFIDENCE, Interval, paired_difference

RANDOM_ROW = "random_init"  # the randomly initialised reference row of every report
XLEARNER_ROW = Variant.xlearner.value  # the row of the X-Learner variant
HOLDS, WITHIN_NOISE, REVERSED, ONE_SEED = "holds", "within noise", "reversed", "needs 2+ seeds"
CLOSE_TOLERANCE = 2.0  # points: how far "close" may be (the paper: 0.3-1.5 points apart)
# summary metrics of a report row (xlearner/transfer/report.py): key -> label
METRICS = {
    "avg_cls": "AVG Cls",
    "det_map": "Det mAP",
    "det_ap50": "Det AP50",  # PASCAL VOC AP50, the paper's "PASCAL Det" column
    "seg_miou": "Seg mIoU",
}

Scores = Mapping[str, Mapping[str, Mapping[int, float]]]  # row -> metric -> seed -> score


@dataclass(frozen=True)
class Claim:
    """``better`` scores above ``worse`` (ordering), or within a tolerance of it (close)."""

    statement: str
    better: str
    worse: str
    kind: Literal["ordering", "close"] = "ordering"


PAPER_CLAIMS = (
    Claim("X-Learner > hard sharing", XLEARNER_ROW, "hard_sharing"),
    Claim("reconciliation > none", XLEARNER_ROW, "no_reconciliation"),
    Claim("lower-level input > same level only", XLEARNER_ROW, "xlearner_t"),
    Claim("Expansion-Squeeze > Squeeze-Expansion", XLEARNER_ROW, "squeeze_expansion"),
    Claim("pruning close to distillation", "prune", XLEARNER_ROW, kind="close"),
)


def claims_for(rows: list[str]) -> list[Claim]:
    """The paper's claims this run's ``rows`` can check, then "<left out> helps" for each
    ``without:`` row, then pre-training > random."""
    present = set(rows)
    claims = [c for c in PAPER_CLAIMS if {c.better, c.worse} <= present]
    if XLEARNER_ROW in present:
        claims += [
            Claim(f"{row.removeprefix(WITHOUT)} helps (X-Learner > {row})", XLEARNER_ROW, row)
            for row in rows
            if row.startswith(WITHOUT)
        ]
    if RANDOM_ROW in present:
        claims += [
            Claim(f"pre-training > random ({row})", row, RANDOM_ROW)
            for row in rows
            if row != RANDOM_ROW
        ]
    return claims


def verdict(difference: Interval, kind: str, tolerance: float = CLOSE_TOLERANCE) -> str:
    """What the interval of ``better - worse`` says about a claim of ``kind``."""
    low, high = difference.low, difference.high
    if low is None or high is None:
        return ONE_SEED
    if kind == "close":
        if -tolerance <= low and high <= tolerance:
            return HOLDS
        return REVERSED if low > tolerance or high < -tolerance else WITHIN_NOISE
    if low > 0:
        return HOLDS
    return REVERSED if high < 0 else WITHIN_NOISE


def evaluate_claims(
    scores: Scores,
    *,
    tolerance: float = CLOSE_TOLERANCE,
    confidence: float = CONFIDENCE,
) -> list[dict]:
    """Every claim of :func:`claims_for` on every summary metric both its rows have:
    ``{"claim", "better", "worse", "kind", "metric", "difference", "low", "high", "n",
    "verdict"}`` (``difference`` = mean of ``better - worse`` over the paired seeds)."""
    checked = []
    for claim in claims_for(list(scores)):
        for metric in METRICS:
            better = scores[claim.better].get(metric) or {}
            worse = scores[claim.worse].get(metric) or {}
            if not set(better) & set(worse):
                continue
            difference = paired_difference(better, worse, confidence)
            checked.append(
                {
                    "claim": claim.statement,
                    "better": claim.better,
                    "worse": claim.worse,
                    "kind": claim.kind,
                    "metric": metric,
                    "difference": difference.mean,
                    "low": difference.low,
                    "high": difference.high,
                    "n": difference.n,
                    "verdict": verdict(difference, claim.kind, tolerance),
                }
            )
    return checked
