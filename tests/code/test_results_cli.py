"""``xlearner report`` and ``xlearner run --seeds`` (xlearner_cli/main.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.pipeline_config import tiny_config_dict
from xlearner.store import open_store
from xlearner.store_keys import RESULT, results_latest
from xlearner.transfer.report import build_report
from xlearner.transfer.results import results_index
from xlearner_cli.main import app, load_seeded


def write_config(tmp_path: Path, synth_data, **overrides) -> Path:
    data = tiny_config_dict(
        str(synth_data.root), str(tmp_path / "store"), sources=("shapes_cls",),
        downstream=("down_cls_a",), **overrides,
    )  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def publish_run(store_uri: str, scores: dict[int, tuple[float, float]], name: str = "tiny") -> None:
    """What a run leaves in the store: one transfer output per seed, and its pointer."""
    store = open_store(store_uri)
    outs = {}
    for seed, (xlearner, random) in scores.items():
        report = build_report(
            [{"name": "xlearner", "cls": {"down_cls_a": xlearner}},
             {"name": "random_init", "cls": {"down_cls_a": random}}]
        )  # fmt: skip
        out = store.uri(f"runs/transfer/key{seed}")
        open_store(out).write_json(RESULT, {"out": out, "report": report})
        outs[seed] = out
    store.write_json(results_latest(name), results_index("xlearner", outs))


def test_report_writes_the_results_page_from_the_store(tmp_path, synth_data):
    config = write_config(tmp_path, synth_data)
    publish_run(str(tmp_path / "store"), {0: (55.0, 40.0), 1: (57.0, 41.0), 2: (56.0, 42.0)})
    reading = tmp_path / "reading.md"
    reading.write_text("# Results\n\nWhat holds at our scale.\n")
    out = tmp_path / "page"
    result = CliRunner().invoke(
        app, ["report", "-c", str(config), "--out", str(out), "--preamble", str(reading)]
    )
    assert result.exit_code == 0, result.output
    page = (out / "results.md").read_text()
    assert page.startswith("# Results\n\nWhat holds at our scale.\n\nWritten by `xlearner report")
    assert "(seeds 0 1 2)" in page
    assert "| xlearner    | 56.0 ± 2.5 |" in page  # 55, 57, 56: sd 1, t(0.975, 2) / sqrt(3)
    claims = json.loads((out / "results.json").read_text())["claims"]
    assert [(c["claim"], c["verdict"]) for c in claims] == [
        ("pre-training > random (xlearner)", "holds")
    ]
    assert (out / "results.png").stat().st_size > 1000
    assert "pre-training > random (xlearner)" in result.output


def test_report_page_names_the_overrides_it_was_written_with(tmp_path, synth_data):
    config = write_config(tmp_path, synth_data)
    publish_run(str(tmp_path / "store"), {0: (55.0, 40.0), 1: (57.0, 41.0)}, name="variants")
    out = tmp_path / "page"
    args = ["report", "-c", str(config), "--set", "name=variants", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    page = (out / "results.md").read_text()
    assert page.startswith(f"Written by `xlearner report -c {config} --set 'name=variants' --out")


def test_report_without_a_finished_run_names_the_fix(tmp_path, synth_data):
    config = write_config(tmp_path, synth_data)
    result = CliRunner().invoke(app, ["report", "-c", str(config), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "no run of config 'tiny' finished in this store" in result.output
    assert "xlearner run" in result.output


def test_report_names_a_deleted_transfer_output(tmp_path, synth_data):
    config = write_config(tmp_path, synth_data)
    publish_run(str(tmp_path / "store"), {0: (55.0, 40.0), 1: (57.0, 41.0)})
    (tmp_path / "store" / "runs" / "transfer" / "key1" / RESULT).unlink()
    result = CliRunner().invoke(app, ["report", "-c", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "transfer output of seed 1 was deleted" in result.output
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.parametrize(("seeds", "expected"), [(3, [5, 6, 7]), (None, None)])
def test_run_seeds_option_sets_the_seeds(tmp_path, synth_data, seeds, expected):
    config = write_config(tmp_path, synth_data, seed=5)
    cfg = load_seeded(config, ["name=seeded"], seeds)
    assert cfg.seeds == expected and cfg.name == "seeded"
    assert cfg.run_seeds == (expected or [5])
    assert "--seeds" in CliRunner().invoke(app, ["run", "--help"]).output


def test_run_with_no_seeds_fails_naming_the_option(tmp_path, synth_data):
    config = write_config(tmp_path, synth_data)
    result = CliRunner().invoke(app, ["run", "-c", str(config), "--seeds", "0"])
    assert result.exit_code == 2 and "--seeds" in result.output
    result = CliRunner().invoke(app, ["run", "-c", str(config), "--set", "seeds=[]"])
    assert result.exit_code == 2
    assert "seeds: an empty list runs nothing" in result.output
