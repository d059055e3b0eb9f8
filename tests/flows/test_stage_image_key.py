"""Stage outputs of Docker-run stages are keyed by the stage image's id on the real
engine (issue 15 item 6): an image rebuilt under the same tag re-runs its stages."""

from __future__ import annotations

import uuid

import pytest

from flows.caching import code_version, source_tree_hash, stage_key
from flows.images import PULL_POLICY, stage_image, worker_image
from flows.operator import IMAGE_ENV
from xlearner.config import ConfigError, RunnerConfig

DOCKER = RunnerConfig(kind="docker")


@pytest.fixture
def engine_env(docker_engine, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", docker_engine.base_url)
    monkeypatch.delenv("XLEARNER_CODE_VERSION", raising=False)
    return docker_engine


def test_the_key_holds_the_stage_image_id_and_follows_a_rebuild(engine_env):
    client, tag = engine_env.client, f"xlearner-key-test:{uuid.uuid4().hex[:8]}"
    repository, version = tag.split(":")
    client.images.get(engine_env.image).tag(repository, version)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(IMAGE_ENV, tag)
        first = code_version(DOCKER)
        assert first == client.images.get(engine_env.image).id
        key = stage_key("expand", {"a": 1}, {}, DOCKER)
        assert key == stage_key("expand", {"a": 1}, {}, DOCKER)  # stable while unchanged

        # "rebuild" the image under the same tag: a new layer, so a new id
        container = client.containers.run(
            engine_env.image, ["sh", "-c", "echo rebuilt > /tmp/marker"], detach=True
        )
        try:
            container.wait(timeout=60)
            container.commit(repository=repository, tag=version)
        finally:
            container.remove(force=True)
        assert code_version(DOCKER) == client.images.get(tag).id != first
        assert stage_key("expand", {"a": 1}, {}, DOCKER) != key
    client.images.remove(tag, force=True)


def test_process_stages_keep_the_source_hash_and_a_missing_image_is_named(engine_env, monkeypatch):
    assert code_version(RunnerConfig(kind="process")) == source_tree_hash() == code_version()
    monkeypatch.setenv(IMAGE_ENV, "xlearner-stage:not-built")
    with pytest.raises(ConfigError, match=r"xlearner-stage:not-built.*docker build"):
        code_version(DOCKER)


def test_images_are_versioned_and_used_where_present():
    from importlib.metadata import version

    assert worker_image() == f"xlearner-worker:{version('xlearner')}"
    assert stage_image() == f"xlearner-stage:{version('xlearner')}"
    assert PULL_POLICY == "IfNotPresent"
