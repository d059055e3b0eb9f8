"""Every variant's branch of the flow at a tiny budget (issue 13).

The plan of one seed (``flows.pipeline.seed_rows``) runs with a stand-in for
``run_stage`` that records every stage call, on a classification and a segmentation
source. Two modes:

- ``plan`` (fast): the ingests run, the other calls are answered with placeholder
  results; asserted are the stages each branch calls and their inputs (sub-models,
  manifests, modes, hints, seeds);
- ``run`` (slow): each call is executed in this process (``stages.<name>.main``, the
  code a stage process runs, without Prefect or a child interpreter) at a tiny budget;
  also asserted is what it trained (architectures, parameter counts, gammas) from the
  published files.

Stage outputs live in one store per mode, so the variants share what they share, as in
a run.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from flows import pipeline
from flows.plan import EXPERT_SEED_OFFSET, PipelineContext, Plan, publish_config
from tests.pipeline_config import TINY_TRAIN, tiny_config_dict
from xlearner.config import load_config, validate_config
from xlearner.contract import (
    HARD_SHARING_TASK,
    IngestCall,
    ReconcileCall,
    SqueezeCall,
    StageCall,
    TransferCall,
)
from xlearner.models.backbone import count_parameters
from xlearner.models.loading import load_backbone
from xlearner.models.registry import create_backbone
from xlearner.store import open_store
from xlearner.store_keys import RESULT
from xlearner.transfer.report import build_report

SOURCES = ("shapes_cls", "shapes_seg")
TINY_PARAMETERS = count_parameters(create_backbone("tiny_resnet"))


class Done:
    def __init__(self, result: dict):
        self._result = result

    def result(self) -> dict:
        return self._result


def placeholder(call: StageCall) -> dict:
    """What a stage would answer, for the ``plan`` mode (nothing trained)."""
    if isinstance(call, TransferCall):
        rows = [{"name": n, "cls": {"down_cls_a": 50.0}} for n in call.backbones]
        return {"out": call.out, "report": build_report(rows)}
    return {"out": call.out, "model": f"{call.out}/model", "backbone": f"{call.out}/backbone"}


class RecordedStages:
    """Stands in for ``run_stage``: records every call; runs it here when ``execute``."""

    def __init__(self, execute: bool):
        self.execute = execute
        self.calls: list[tuple[str, StageCall]] = []

    def submit(self, ctx, label: str, call: StageCall) -> Done:
        self.calls.append((label, call))
        if not self.execute and not isinstance(call, IngestCall):  # the ingests are real
            return Done(placeholder(call))
        out = open_store(call.out)
        if not out.exists(RESULT):
            module = importlib.import_module(f"stages.{call.stage.value}")
            assert module.main(call.to_argv()) == 0, f"stage {label} failed"
        return Done(out.read_json(RESULT))

    def labels(self, since: int = 0) -> list[str]:
        return [label for label, _ in self.calls[since:]]

    def call(self, label: str) -> StageCall:
        return next(c for lbl, c in reversed(self.calls) if lbl == label)

    def result(self, label: str) -> dict:
        """What the last call labelled ``label`` answered."""
        call = self.call(label)
        return open_store(call.out).read_json(RESULT) if self.execute else placeholder(call)


@pytest.fixture(scope="module", params=["plan", pytest.param("run", marks=pytest.mark.slow)])
def stages(request) -> RecordedStages:
    return RecordedStages(execute=request.param == "run")


@pytest.fixture(scope="module")
def work(tmp_path_factory, stages) -> Path:
    return tmp_path_factory.mktemp("run" if stages.execute else "plan")


def make_plan(
    synth_data, work: Path, stages: RecordedStages, monkeypatch, extra_cls: bool = False, **kw
) -> Plan:
    """The plan of a tiny config over ``SOURCES`` (and, with ``extra_cls``, a second
    classification source ``extra_cls``), its ingests done."""
    monkeypatch.setattr("flows.plan.run_stage", stages)
    data = tiny_config_dict(
        str(synth_data.root), str(work / "store"), f"sqlite:///{work / 'mlflow.db'}",
        sources=SOURCES, downstream=("down_cls_a",), **kw,
    )  # fmt: skip
    if extra_cls:  # another set of shape images, not the downstream one
        data["sources"].append({**synth_data.source("down_cls_b"), "name": "extra_cls"})
    cfg = validate_config(data)
    store_uri = str((work / "store").resolve())
    plan = Plan(PipelineContext(cfg, publish_config(cfg, store_uri), None))
    plan.ingest()
    return plan


def parameters(result: dict) -> int:
    """The parameter count of a row's backbone, from its published files."""
    return count_parameters(load_backbone(Path(result["backbone"])))


def stage_config(call: StageCall):
    """The config a stage call reads (with its overrides), as the stage loads it."""
    return load_config(call.config, list(getattr(call, "overrides", None) or []))


def run_branch(synth_data, work, stages, monkeypatch, **overrides) -> tuple[dict, list[str]]:
    """The rows of one seed's plan and the labels of the stage calls it submitted (a call
    the variants share is submitted once: the plan memoises them by output)."""
    plan = make_plan(synth_data, work, stages, monkeypatch, **overrides)
    start = len(stages.calls)
    rows = pipeline.seed_rows(plan)
    return rows, stages.labels(start)


XLEARNER = ["expand-cls", "expand-seg", "reconcile-full", "squeeze-xlearner"]


def test_xlearner_expands_per_task_reconciles_and_distils(synth_data, work, stages, monkeypatch):
    rows, labels = run_branch(synth_data, work, stages, monkeypatch)
    assert set(rows) == {"xlearner", "random_init"} and labels == XLEARNER
    reconcile = stages.call("reconcile-full")
    assert isinstance(reconcile, ReconcileCall) and set(reconcile.sub_models) == {"cls", "seg"}
    assert set(reconcile.manifests) == set(SOURCES)  # joint training on every source
    assert set(stages.call("expand-cls").manifests) == {"shapes_cls"}
    if stages.execute:
        assert parameters(rows["xlearner"]) == TINY_PARAMETERS


@pytest.mark.parametrize(
    ("variant", "mode"), [("no_reconciliation", "none"), ("xlearner_t", "same_level")]
)
def test_reconciliation_ablations_share_the_sub_backbones(
    synth_data, work, stages, monkeypatch, variant, mode
):
    rows, labels = run_branch(synth_data, work, stages, monkeypatch, variant=variant)
    assert labels == ["expand-cls", "expand-seg", f"reconcile-{mode}", f"squeeze-{variant}"]
    reconcile = stages.call(f"reconcile-{mode}")
    assert reconcile.overrides == [f"reconcile.mode={mode}"]
    assert stage_config(reconcile).reconcile.mode == mode
    if stages.execute:
        gammas = stages.result(f"reconcile-{mode}")["gammas"]["gamma_parameters"]
        if mode == "none":
            assert gammas == 0
        else:  # same level only: fewer gammas than full reconciliation (if it ran)
            full = open_store(stages.call("reconcile-full").out)
            if full.exists(RESULT):
                assert 0 < gammas < full.read_json(RESULT)["gammas"]["gamma_parameters"]
        assert parameters(rows[variant]) == TINY_PARAMETERS


def test_prune_prunes_the_expanded_model_to_one_backbone(synth_data, work, stages, monkeypatch):
    rows, labels = run_branch(synth_data, work, stages, monkeypatch, variant="prune")
    assert labels == ["expand-cls", "expand-seg", "reconcile-full", "squeeze-prune"]
    squeeze = stages.call("squeeze-prune")
    assert stage_config(squeeze).squeeze.method == "prune"
    assert squeeze.teacher == stages.result("reconcile-full")["model"]
    if stages.execute:
        assert parameters(rows["prune"]) == pytest.approx(TINY_PARAMETERS, rel=0.10)


def test_hard_sharing_trains_one_trunk_on_every_source(synth_data, work, stages, monkeypatch):
    rows, labels = run_branch(synth_data, work, stages, monkeypatch, variant="hard_sharing")
    assert labels == ["hard_sharing"]
    call = stages.call("hard_sharing")
    assert call.task == HARD_SHARING_TASK and set(call.manifests) == set(SOURCES)
    if stages.execute:
        assert parameters(rows["hard_sharing"]) == TINY_PARAMETERS


def test_squeeze_expansion_squeezes_first_then_expands(synth_data, work, stages, monkeypatch):
    rows, labels = run_branch(synth_data, work, stages, monkeypatch, variant="squeeze_expansion")
    assert labels == [
        "expand-cls", "expand-seg", "squeeze-before-expansion", "expand-after-squeeze",
    ]  # fmt: skip
    squeezed = stages.call("squeeze-before-expansion")
    assert set(squeezed.sub_models) == {"cls", "seg"} and not squeezed.teacher
    after = stages.call("expand-after-squeeze")
    assert after.task == HARD_SHARING_TASK and after.steps == TINY_TRAIN["steps"]
    assert after.init_backbone == stages.result("squeeze-before-expansion")["backbone"]
    if stages.execute:
        assert parameters(rows["squeeze_expansion"]) == TINY_PARAMETERS


def test_single_task_trains_one_backbone_per_source(synth_data, work, stages, monkeypatch):
    rows, labels = run_branch(synth_data, work, stages, monkeypatch, variant="single_task")
    assert set(rows) == {"single_task:shapes_cls", "single_task:shapes_seg", "random_init"}
    assert labels == ["expand-cls-shapes_cls", "expand-seg-shapes_seg"]
    assert stages.call("expand-cls-shapes_cls").source == "shapes_cls"
    # one source per task here: the single-task baseline is that task's sub-backbone
    assert rows["single_task:shapes_cls"]["out"] == stages.call("expand-cls").out
    if stages.execute:
        assert parameters(rows["single_task:shapes_seg"]) == TINY_PARAMETERS


def test_xlearner_pp_adds_one_expert_per_source_and_the_hint_files(
    synth_data, work, stages, monkeypatch, tmp_path
):
    from safetensors.torch import save_file

    weights = tmp_path / "hint.safetensors"
    state = create_backbone("tiny_resnet").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    squeeze_cfg = {"train": TINY_TRAIN, "hints": [{"name": "imagenet", "path": str(weights)}]}
    rows, labels = run_branch(
        synth_data, work, stages, monkeypatch, variant="xlearner_pp",
        squeeze={**squeeze_cfg, "hint_weight": 0.5},
    )  # fmt: skip
    assert labels == [*XLEARNER[:3], "expand-cls-shapes_cls", "expand-seg-shapes_seg",
                      "squeeze-xlearner_pp"]  # fmt: skip
    subs = {stages.call("expand-cls").out, stages.call("expand-seg").out}
    for label in ("expand-cls-shapes_cls", "expand-seg-shapes_seg"):
        expert = stages.call(label)  # a run of its own (its own seed), not the sub-backbone
        assert stage_config(expert).seed == EXPERT_SEED_OFFSET and expert.out not in subs
    squeeze = stages.call("squeeze-xlearner_pp")
    assert isinstance(squeeze, SqueezeCall) and set(squeeze.hints) == set(SOURCES)
    loaded = stage_config(squeeze).squeeze
    assert loaded.hint_weight == 0.5 and [h.name for h in loaded.hints] == ["imagenet"]
    if stages.execute:
        assert stages.result("squeeze-xlearner_pp")["squeeze"]["hints"] == sorted(
            [*SOURCES, "imagenet"]
        )
        assert parameters(rows["xlearner_pp"]) == TINY_PARAMETERS
    # plain X-Learner's squeeze is told there are no hint files, and its key ignores them
    rows, labels = run_branch(synth_data, work, stages, monkeypatch, squeeze=squeeze_cfg)
    plain = stages.call("squeeze-xlearner")
    assert stage_config(plain).squeeze.hints == [] and labels == XLEARNER
    without_hints = make_plan(synth_data, work, stages, monkeypatch)
    assert rows["xlearner"]["out"] == pipeline.seed_rows(without_hints)["xlearner"]["out"]


def test_xlearner_r_uses_half_width_sub_backbones_and_the_configured_student(
    synth_data, work, stages, monkeypatch
):
    small = {"steps": 2, "batch_size": 4, "warmup_steps": 1}
    rows, labels = run_branch(
        synth_data, work, stages, monkeypatch, variant="xlearner_r",
        reconcile={"train": small, "gamma": "light"},
        tasks={t: small for t in ("cls", "seg")},
    )  # fmt: skip
    assert labels == XLEARNER
    for task in ("cls", "seg"):
        assert stage_config(stages.call(f"expand-{task}")).model.backbone == "half_resnet50"
    squeezed = stage_config(stages.call("squeeze-xlearner"))
    assert squeezed.student_backbone == "tiny_resnet"
    if stages.execute:
        half = count_parameters(create_backbone("half_resnet50"))
        assert stages.result("expand-cls")["parameters"] >= half
        assert parameters(rows["xlearner_r"]) == TINY_PARAMETERS


@pytest.mark.parametrize(
    ("entry", "left", "labels_after"),
    [
        ("without:seg", {"cls": ["shapes_cls", "extra_cls"]}, ["reconcile-full"]),
        ("without:extra_cls", {"cls": ["shapes_cls"], "seg": ["shapes_seg"]},
         ["expand-cls", "reconcile-full"]),
    ],
)  # fmt: skip
def test_without_leaves_one_task_or_source_out(
    synth_data, work, stages, monkeypatch, entry, left, labels_after
):
    rows, labels = run_branch(
        synth_data, work, stages, monkeypatch, extra_cls=True, compare=[entry]
    )
    assert set(rows) == {"xlearner", entry, "random_init"}
    assert labels == [*XLEARNER, *labels_after, "squeeze-xlearner"]
    reduced = stages.call("reconcile-full")  # the last one: the reduced X-Learner's
    assert set(reduced.sub_models) == set(left)
    assert set(reduced.manifests) == {s for sources in left.values() for s in sources}
    assert set(stages.call("expand-cls").manifests) == set(left["cls"])
    assert rows[entry]["out"] != rows["xlearner"]["out"]
    if stages.execute:
        assert parameters(rows[entry]) == TINY_PARAMETERS


def test_seeds_share_the_ingests_and_train_everything_else_per_seed(
    synth_data, work, stages, monkeypatch
):
    plan = make_plan(
        synth_data, work, stages, monkeypatch, seeds=[0, 1], compare=["no_reconciliation"]
    )
    start = len(stages.calls)
    rows_by_seed, transfers = pipeline.train_and_transfer(plan)
    calls = stages.calls[start:]
    assert set(rows_by_seed) == set(transfers) == {0, 1}
    assert not any(label.startswith("ingest-") for label, _ in calls)  # ingested once, before
    per_seed = {s: [c.out for _, c in calls if stage_config(c).seed == s] for s in (0, 1)}
    # 2 expands, 2 reconciles, 2 squeezes and the transfer, none shared between seeds
    assert len(per_seed[0]) == len(per_seed[1]) == 7
    assert not set(per_seed[0]) & set(per_seed[1])
    for seed in (0, 1):
        names = {row["name"] for row in transfers[seed]["report"]["rows"]}
        assert names == {"xlearner", "no_reconciliation", "random_init"}
    results = pipeline.record_results(plan.cfg, transfers)
    assert results["seeds"] == [0, 1]
    assert "reconciliation > none" in {claim["claim"] for claim in results["claims"]}
    index = json.loads((work / "store" / "results" / "tiny" / "latest.json").read_text())
    assert set(index["transfers"].values()) == {transfers[s]["out"] for s in (0, 1)}
