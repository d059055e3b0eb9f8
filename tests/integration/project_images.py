"""The project's images, built from ``docker/Dockerfile.stage`` and
``docker/Dockerfile.worker`` on a Docker engine as an operator builds them.

No registry is reachable here, so the base image the Dockerfiles name
(:data:`BASE_IMAGE`) is made the way the official one is: Debian bookworm (debootstrap)
with CPython in ``/usr/local``, here the interpreter that runs the tests, and this
host's CA bundle (its egress re-signs TLS). The Dockerfiles' pip then reaches PyPI
(``PIP_CERT``), and the ``file://`` indexes of this host's pip configuration, served on
127.0.0.1 (``PIP_EXTRA_INDEX_URL``), give the largest wheels (torch and its CUDA
libraries) from this disk. Both builds take torch from the same index
(``TORCH_INDEX_URL``), so they share that layer.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "python:3.11-slim-bookworm"  # the Dockerfiles' PYTHON_IMAGE default
# What CPython's extension modules link to, beyond debootstrap's minimal base.
BASE_PACKAGES = (
    "ca-certificates,libssl3,libffi8,zlib1g,libsqlite3-0,libbz2-1.0,liblzma5,"
    "libncursesw6,libreadline8,libgomp1"
)
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BUILD_TIMEOUT_S = 1800
FIRST_INDEX_PORT = 38571  # the local indexes take this port and the next ones (served_indexes)
# Free disk the two builds need at their peak (layers of both images and their builders).
BUILD_DISK_BYTES = 35 * 2**30


def make_base_image(client, workdir: Path) -> str:
    """:data:`BASE_IMAGE` on the engine (made unless present); raises with the reason."""
    import docker

    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(BASE_IMAGE)
        return BASE_IMAGE
    python = Path(sys.base_prefix)
    if python == Path("/usr"):
        raise RuntimeError("the test interpreter is the system's: no /usr/local CPython to copy")
    rootfs = workdir / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", rootfs],
        check=True,
        capture_output=True,
        timeout=900,
    )
    local = rootfs / "usr" / "local"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = Path("lib") / version / "site-packages"
    skip = {site, Path("lib") / version / "test"}
    shutil.copytree(
        python,
        local,
        symlinks=True,
        dirs_exist_ok=True,
        ignore=lambda folder, names: [
            n for n in names if n == "__pycache__" or Path(folder, n).relative_to(python) in skip
        ],
    )
    (local / site).mkdir(parents=True)
    for pip in (python / site).glob("pip*"):  # pip, as the official image has it
        shutil.copytree(pip, local / site / pip.name, symlinks=True)
    for script in (local / "bin").iterdir():  # the interpreter's own commands only
        if not script.name.startswith(("python", "pip", "pydoc")):
            script.unlink()
    (local / "bin" / "python").unlink(missing_ok=True)
    (local / "bin" / "python").symlink_to(version)
    shutil.copyfile(CA_BUNDLE, rootfs / CA_BUNDLE.lstrip("/"))
    subprocess.run(["chroot", rootfs, "/sbin/ldconfig"], check=True)
    archive = workdir / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(rootfs, arcname=".")
    repository, tag = BASE_IMAGE.split(":")
    changes = ["ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"]
    client.api.import_image_from_file(
        str(archive), repository=repository, tag=tag, changes=[*changes, 'CMD ["python3"]']
    )
    shutil.rmtree(rootfs)
    archive.unlink()
    return BASE_IMAGE


def local_index_dirs() -> list[Path]:
    """The folders of the ``file://`` indexes in this host's pip configuration."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    folders = []
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(("index-url", "extra-index-url")):
            for url in value.strip("'\"").split():
                if url.startswith("file://") and Path(url[7:]).is_dir():
                    folders.append(Path(url[7:]))
    return folders


@contextlib.contextmanager
def served_indexes(folders: list[Path]) -> Iterator[list[str]]:
    """Each index folder's parent served over HTTP on 127.0.0.1; yields the index URLs.

    The ports are fixed where free (:data:`FIRST_INDEX_PORT`): the URLs are build arguments,
    part of the build cache's keys, so an engine that keeps its cache
    (``XLEARNER_TEST_BUILD_DOCKER_HOST``) rebuilds only what changed."""
    servers = []
    try:
        for port, folder in enumerate(folders, start=FIRST_INDEX_PORT):
            handler = functools.partial(Quiet, directory=str(folder.parent))
            try:
                server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
            except OSError:  # taken: any free port
                server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append((server, f"http://127.0.0.1:{server.server_port}/{folder.name}"))
        yield [url for _, url in servers]
    finally:
        for server, _ in servers:
            server.shutdown()
            server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def build_image(base_url: str, dockerfile: str, tag: str, buildargs: dict[str, str], log: Path):
    """``docker build -f dockerfile -t tag .`` of the project (host network); its output
    goes to ``log``; raises with the last lines on failure."""
    import docker

    client = docker.DockerClient(base_url=base_url, timeout=BUILD_TIMEOUT_S)
    started = time.monotonic()
    lines: list[str] = []
    with open(log, "a") as out:
        stream = client.api.build(
            path=str(REPO),
            dockerfile=dockerfile,
            tag=tag,
            buildargs=buildargs,
            network_mode="host",
            rm=True,
            forcerm=True,
            decode=True,
        )
        for chunk in stream:
            text = chunk.get("stream") or chunk.get("error") or json.dumps(chunk)
            out.write(text if text.endswith("\n") else text + "\n")
            lines.append(text)
            if "error" in chunk:
                tail = "".join(lines[-30:])
                raise RuntimeError(f"docker build -f {dockerfile} failed:\n{tail}")
    print(f"built {tag} from {dockerfile} in {time.monotonic() - started:.0f} s")
    client.close()
    return tag


def project_build_args(index_urls: list[str], docker_gid: str) -> dict[str, str]:
    """The build arguments of both images on this host (see the module docstring)."""
    args = {
        "PIP_CERT": CA_BUNDLE,
        "TORCH_INDEX_URL": "https://pypi.org/simple",
        "DOCKER_GID": docker_gid,
    }
    if index_urls:
        args["PIP_EXTRA_INDEX_URL"] = " ".join(index_urls)
    if proxy := os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        args["HTTPS_PROXY"] = proxy
    return args
