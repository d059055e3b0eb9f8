"""The claims table (xlearner/claims.py): verdicts for hand-built rows."""

from __future__ import annotations

import pytest

from xlearner.claims import (
    HOLDS,
    ONE_SEED,
    REVERSED,
    WITHIN_NOISE,
    claims_for,
    evaluate_claims,
    verdict,
)
from xlearner.stats import Interval


def seeds(*values: float) -> dict[int, float]:
    return dict(enumerate(values))


# AVG Cls per seed; differences to xlearner chosen so that each verdict occurs
SCORES = {
    "xlearner": {"avg_cls": seeds(56.0, 58.0, 57.0), "seg_miou": seeds(40.0, 41.0, 42.0)},
    # 4, 5, 6 points below on every seed: the ordering holds
    "hard_sharing": {"avg_cls": seeds(52.0, 53.0, 51.0)},
    # +-3 around xlearner: within noise
    "no_reconciliation": {"avg_cls": seeds(59.0, 55.0, 57.5)},
    # above xlearner on every seed: reversed
    "xlearner_t": {"avg_cls": seeds(58.0, 60.5, 59.0)},
    # within 0.5 of xlearner: close
    "prune": {"avg_cls": seeds(55.8, 57.6, 57.1), "seg_miou": seeds(30.0, 31.0, 32.5)},
    "random_init": {"avg_cls": seeds(40.0, 41.0, 39.0), "seg_miou": seeds(20.0, 20.5, 21.0)},
}


def by_claim(claims: list[dict]) -> dict[tuple[str, str], dict]:
    return {(c["claim"], c["metric"]): c for c in claims}


def test_each_paper_claim_gets_its_verdict():
    claims = by_claim(evaluate_claims(SCORES))
    assert claims["X-Learner > hard sharing", "avg_cls"]["verdict"] == HOLDS
    assert claims["reconciliation > none", "avg_cls"]["verdict"] == WITHIN_NOISE
    assert claims["lower-level input > same level only", "avg_cls"]["verdict"] == REVERSED
    assert claims["pruning close to distillation", "avg_cls"]["verdict"] == HOLDS
    # on segmentation pruning is 10 points lower on every seed: clearly not close
    assert claims["pruning close to distillation", "seg_miou"]["verdict"] == REVERSED
    # no squeeze_expansion row: that claim is not listed
    assert not any(c.startswith("Expansion-Squeeze") for c, _ in claims)


def test_a_claim_carries_its_paired_difference_and_interval():
    claim = by_claim(evaluate_claims(SCORES))["X-Learner > hard sharing", "avg_cls"]
    # differences 4, 5, 6: mean 5, sd 1, half-width t(0.975, 2) / sqrt(3) = 2.4841
    assert claim["difference"] == pytest.approx(5.0)
    assert claim["low"] == pytest.approx(5.0 - 2.48414, abs=1e-4)
    assert claim["high"] == pytest.approx(5.0 + 2.48414, abs=1e-4)
    assert (claim["better"], claim["worse"], claim["n"]) == ("xlearner", "hard_sharing", 3)


def test_pretraining_beats_random_is_one_claim_per_trained_row_and_metric():
    claims = by_claim(evaluate_claims(SCORES))
    random_claims = {key for key in claims if key[0].startswith("pre-training > random")}
    assert len(random_claims) == 5 + 2  # five rows on AVG Cls, two with a seg score
    assert claims["pre-training > random (prune)", "seg_miou"]["verdict"] == HOLDS
    assert claims["pre-training > random (xlearner)", "avg_cls"]["difference"] == pytest.approx(17)


def test_one_seed_gives_no_verdict():
    one = {name: {"avg_cls": {0: s["avg_cls"][0]}} for name, s in SCORES.items()}
    claims = evaluate_claims(one)
    assert claims and all(c["verdict"] == ONE_SEED and c["low"] is None for c in claims)


@pytest.mark.parametrize(
    ("low", "high", "kind", "expected"),
    [
        (0.1, 3.0, "ordering", HOLDS),
        (-0.1, 3.0, "ordering", WITHIN_NOISE),
        (-3.0, -0.2, "ordering", REVERSED),
        (-1.9, 1.9, "close", HOLDS),
        (-2.5, 1.0, "close", WITHIN_NOISE),
        (2.1, 4.0, "close", REVERSED),
        (-6.0, -2.5, "close", REVERSED),
    ],
)
def test_verdict_boundaries(low, high, kind, expected):
    assert verdict(Interval((low + high) / 2, low, high, 3), kind, tolerance=2.0) == expected


def test_claims_follow_the_rows_present():
    statements = [c.statement for c in claims_for(["xlearner", "squeeze_expansion", "random_init"])]
    assert statements == [
        "Expansion-Squeeze > Squeeze-Expansion",
        "pre-training > random (xlearner)",
        "pre-training > random (squeeze_expansion)",
    ]
    assert claims_for(["hard_sharing", "prune"]) == []


def test_each_left_out_task_or_source_is_a_claim_that_it_helps():
    scores = {
        "xlearner": SCORES["xlearner"],
        # 2, 3, 4 points below X-Learner on every seed: the left-out source helped
        "without:fresh_cls": {"avg_cls": seeds(54.0, 55.0, 53.0)},
        "without:det": {"avg_cls": seeds(57.0, 57.5, 58.0)},  # -1, +0.5, -1: within noise
    }
    claims = by_claim(evaluate_claims(scores))
    helped = claims["fresh_cls helps (X-Learner > without:fresh_cls)", "avg_cls"]
    assert (helped["better"], helped["worse"]) == ("xlearner", "without:fresh_cls")
    assert helped["difference"] == pytest.approx(3.0) and helped["verdict"] == HOLDS
    assert claims["det helps (X-Learner > without:det)", "avg_cls"]["verdict"] == WITHIN_NOISE
    # without the X-Learner row there is nothing to measure the left-out one against
    assert claims_for(["hard_sharing", "without:fresh_cls"]) == []
