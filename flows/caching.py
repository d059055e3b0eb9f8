"""Cache keys of stage outputs: what makes a stage's result reusable across runs.

A stage's output lives at ``runs/<stage>/<key>/`` in the store, where ``key`` hashes the
stage, its config section, the keys/versions of its inputs and the code version. A stage
whose ``result.json`` already exists there is skipped; a changed source changes the keys
of exactly the stages that depend on it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from xlearner.config import ConfigError, RunnerConfig, hash_json
from xlearner.data.source_files import dangling_link
from xlearner.store import ArtifactStore, open_store, sha256_file
from xlearner.store_keys import stage_prefix

CODE_ROOTS = ("xlearner", "stages")
KEY_LENGTH = 20


def code_version(runner: RunnerConfig | None = None) -> str:
    """What the stages run: a change of it invalidates every cached stage.

    ``XLEARNER_CODE_VERSION`` when set; for stages in Docker containers (``runner.kind:
    docker``) the id of the stage image on the engine (:func:`stage_image_id`), since the
    flow's own copy of the code need not be the image's; else the hash of the library
    and stage sources here (:func:`source_tree_hash`).
    """
    if env := os.environ.get("XLEARNER_CODE_VERSION"):
        return env
    if runner is not None and runner.kind == "docker":
        from flows.operator import DockerSettings

        return stage_image_id(DockerSettings.from_env().image)
    return source_tree_hash()


@functools.cache
def source_tree_hash() -> str:
    """Hash of the library and stage sources beside this file."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in CODE_ROOTS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def stage_image_id(image: str) -> str:
    """The engine's id (``sha256:...``) of the image tagged ``image``: a rebuilt image under
    the same tag has a new id, so its stages run again. Asked on every call (cheap)."""
    import docker

    try:
        return docker.from_env().images.get(image).id
    except docker.errors.ImageNotFound:
        raise ConfigError(
            f"stage image {image!r} (XLEARNER_DOCKER_IMAGE) is not on the Docker engine; "
            f"build it: docker build -f docker/Dockerfile.stage -t {image} ."
        ) from None
    except docker.errors.DockerException as err:
        raise ConfigError(
            f"cannot ask the Docker engine for the stage image {image!r}: {err}; "
            "check DOCKER_HOST and that this user may use the engine"
        ) from None


def stage_key(stage: str, section: Any, inputs: Any, runner: RunnerConfig | None = None) -> str:
    """The cache key of a stage: its config section, inputs and :func:`code_version`."""
    return hash_json(
        {"stage": stage, "config": section, "inputs": inputs, "code": code_version(runner)}
    )[:KEY_LENGTH]


def stage_out(store_uri: str, stage: str, key: str) -> str:
    """The URI of a stage output: ``runs/<stage>/<key>`` in the store at ``store_uri``."""
    return f"{store_uri.rstrip('/')}/{stage_prefix(stage, key)}"


def source_fingerprint(uri: str, endpoint_url: str | None = None) -> str:
    """Cheap fingerprint of a source folder: names, sizes and modification times / ETags.

    Ingest itself hashes every byte; this lets an unchanged source skip even that.
    """
    if uri.startswith("s3://"):
        store: ArtifactStore = open_store(uri, endpoint_url)
        entries = store.stat(prefix="")  # type: ignore[attr-defined]
        return hash_json(entries)[:KEY_LENGTH]
    root = Path(uri)
    if not root.exists():
        raise ConfigError(f"source folder {uri} does not exist; fix the source's `uri`")
    entries = []
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if dangling_link(str(path)):  # ingest names it (or skips it with skip_invalid)
                entries.append([rel, "dangling symlink", os.readlink(path)])
                continue
            st = path.stat()
            entries.append([rel, st.st_size, st.st_mtime_ns])
    return hash_json(entries)[:KEY_LENGTH]


def file_digest(path: str | None) -> str | None:
    """sha256 of a local input file named by the config (pretrained weights), so that a
    file changed in place re-runs what started from it; None when no file is named.
    Hashed once per (path, size, mtime) however many stage calls name it."""
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"pretrained weights {path} (from the config) is not a file")
    st = file.stat()
    return _digest(file.resolve(), st.st_size, st.st_mtime_ns)


@functools.cache
def _digest(file: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(file)
