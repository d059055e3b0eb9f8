"""The squeezed backbones are worth something (issues 4 and 7).

One pipeline run of the flow (Prefect in a test harness, local store, local MLflow,
process runner) on synthetic sources large enough to learn from: a classification, a
segmentation and an unlabeled source (which feeds the MIM and contrastive
sub-backbones). Beside X-Learner it trains the pruning variant and X-Learner without the
self-supervised tasks. Asserted: both squeeze methods give a backbone of one
sub-backbone's size, and the linear probe of the pruned and the no-SSL backbones beats
the randomly initialised one on the held-out shape set (why not X-Learner with the SSL
tasks: see MARGIN below).
"""

from __future__ import annotations

import pytest

from tests.pipeline_config import tiny_config
from xlearner.data.synth import synthesize
from xlearner.models.backbone import count_parameters
from xlearner.models.registry import create_backbone

pytestmark = pytest.mark.slow

IMAGES_PER_SOURCE = 1000  # fewer and the cls sub-backbone overfits: no transfer to measure
SIZE = 64
# Top-1 points above the random backbone (~40 here; the probe's val split has ~300
# images, so one standard error is ~3 points). Measured over config seeds 0-4 with this
# very fixture (run with `seed=s`, 2026-12-02), points above random:
# prune 28.8, 10.6, 22.1, 50.6, 25.6 and no_ssl 11.2, 11.5, 23.1, 32.4, 17.3; the smallest
# of the ten is 10.6, twice this margin. X-Learner with SSL over the same seeds: -1.3,
# -3.5, 5.1, 21.5, 9.3: no margin holds, so it is not asserted.
MARGIN = 5.0
# X-Learner *with* the SSL tasks is no such claim at this budget: 47.1 and 47.8 with one
# fixed crop per image, 38.5, 41.0 and 37.5 with the same code and other augmentation
# seeds (per-epoch augmentation, issue 16), against random's 39.7. The MIM/contrastive
# targets dominate the FitNet sum here (docs/ssl.md); the seed-backed comparison of
# with and without them is issue 13's.


@pytest.fixture(scope="module")
def report_rows(tmp_path_factory) -> dict[str, dict]:
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import xlearner_pipeline

    work = tmp_path_factory.mktemp("variants")
    synthesize(work / "data", seed=0, images_per_source=IMAGES_PER_SOURCE, image_size=SIZE)
    cfg = tiny_config(
        str(work / "data"), str(work / "store"), f"sqlite:///{work / 'mlflow.db'}",
        sources=("shapes_cls", "shapes_seg", "shapes_unlabeled"), downstream=("down_cls_a",),
        name="variants", variant="xlearner", compare=["prune", "no_ssl"],
        model={"backbone": "tiny_resnet", "image_size": SIZE},
        tasks={
            "cls": {"steps": 200, "batch_size": 32, "lr": 0.003},
            "seg": {"steps": 80, "batch_size": 16, "lr": 0.003},
            "mim": {"steps": 80, "batch_size": 32, "lr": 0.003},
            "contrastive": {"steps": 80, "batch_size": 32, "lr": 0.003},
        },
        reconcile={"train": {"steps": 60, "batch_size": 16, "lr": 0.001}},
        squeeze={"levels": [3, 4], "train": {"steps": 150, "batch_size": 16, "lr": 0.003}},
        transfer={"probe_l2": [1e-3, 1e-2, 1e-1, 1.0]},
        engine={"log_every_steps": 25, "checkpoint_every_steps": 1000, "eval_max_images": 64},
    )  # fmt: skip
    with prefect_test_harness(server_startup_timeout=180):
        result = xlearner_pipeline(config=cfg)
    print(result["report"])
    return {row["name"]: row for row in result["report"]["rows"]}


def test_both_squeeze_methods_give_one_sub_backbone_of_parameters(report_rows):
    one_sub_backbone = count_parameters(create_backbone("tiny_resnet"))
    assert report_rows["xlearner"]["parameters"] == one_sub_backbone  # the distilled student
    assert report_rows["prune"]["parameters"] == pytest.approx(one_sub_backbone, rel=0.10)


@pytest.mark.parametrize("row", ["prune", "no_ssl"])
def test_trained_backbones_transfer_better_than_a_random_one(report_rows, row):
    random_top1 = report_rows["random_init"]["cls"]["down_cls_a"]
    assert report_rows[row]["cls"]["down_cls_a"] > random_top1 + MARGIN, report_rows


def test_report_has_the_ssl_comparison_rows(report_rows):
    assert {"xlearner", "no_ssl", "prune", "random_init"} == set(report_rows)
    # the X-Learner with SSL saw the unlabeled source's images too
    assert report_rows["xlearner"]["train_images"] > report_rows["no_ssl"]["train_images"]
