"""A real Docker engine for the Docker runner tests, and a tiny local test image.

No registry can be reached, so the image is a root file system made here from Debian's
busybox-static and loaded with ``docker import``. The engine is the one already running
(``docker info`` works) or, as root, a private ``dockerd`` started for the session on
its own socket and data folder (vfs storage, no iptables, no bridge: containers use
the host network) and stopped at the end. When neither is possible the tests skip and
say what failed. ``gpu_docker_engine`` is a second private ``dockerd`` that takes GPU
requests on a host without GPUs (for the GPU allocation tests).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE_START_TIMEOUT_S = 60
# Stands in for `python -m stages.<name> ...` inside the test image: it reports how it
# was called and as whom, under the stage protocol.
FAKE_PYTHON = """#!/bin/sh
echo "python $* as $(id -u):$(id -g)"
echo "XLEARNER_RESULT {\\"argv\\": \\"$*\\", \\"uid\\": $(id -u)}"
"""
PASSWD = "root:x:0:0:root:/root:/bin/sh\nxlearner:x:10001:10001:xlearner:/tmp:/bin/sh\n"
GROUP = "root:x:0:\nxlearner:x:10001:\n"
# Stands in for the NVIDIA Container Toolkit: dockerd (20.10) registers its NVIDIA device
# driver when this binary is on its PATH; a GPU request then sets NVIDIA_VISIBLE_DEVICES
# in the container and runs `nvidia-container-runtime-hook prestart` (the container's
# state on stdin) before it starts, which would mount the GPUs. This one mounts nothing.
NVIDIA_HOOK = "nvidia-container-runtime-hook"
# An engine of the developer's for the image builds instead of a private one (see
# build_docker_engine).
BUILD_ENGINE_ENV = "XLEARNER_TEST_BUILD_DOCKER_HOST"
FAKE_NVIDIA_HOOK = "#!/bin/sh\ncat >/dev/null\nexit 0\n"


@dataclass
class DockerEngine:
    client: object  # docker.DockerClient
    base_url: str
    image: str  # busybox test image: sh, sleep, env, ... and a fake `python`

    @property
    def env(self) -> dict[str, str]:
        """Environment for a child process that should use this engine."""
        return {**os.environ, "DOCKER_HOST": self.base_url}


def _connect(base_url: str | None = None):
    """A client that answered a ping, else None."""
    import docker

    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException:
        return None


def _ensure_dockerd() -> str | None:
    """Path of dockerd, installing Debian's docker.io as root if needed; None if impossible."""
    if shutil.which("dockerd") is None and os.geteuid() == 0:
        subprocess.run(
            [str(REPO / "scripts" / "install-system-deps.sh"), "docker.io"],
            check=False,
            timeout=900,
        )
    return shutil.which("dockerd")


def _start_dockerd(
    root: Path, path: str | None = None, storage_driver: str = "vfs"
) -> tuple[subprocess.Popen, str]:
    """``dockerd`` on its own socket under ``root``, with ``path`` as its PATH if given."""
    socket = root / "docker.sock"
    base_url = f"unix://{socket}"
    log_path = root / "dockerd.log"
    command = [
        "dockerd",
        f"--storage-driver={storage_driver}",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'dockerd.pid'}",
        f"--host={base_url}",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, "PATH": path} if path else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if socket.exists() and _connect(base_url) is not None:
            return process, base_url
        time.sleep(0.2)
    _stop_dockerd(process)
    log_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    pytest.skip(f"dockerd did not start (exit code {process.returncode}); its log:\n{log_tail}")


def _stop_dockerd(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # dockerd stops its containers and containerd
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _unmount_under(root: Path) -> None:
    """Unmount what dockerd left mounted under ``root`` (its network namespace file)."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    points = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{root}/")]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _busybox(workdir: Path) -> Path:
    """A static busybox: Debian's busybox-static, installed or downloaded (no root needed)."""
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", "busybox-static"],
        capture_output=True,
        text=True,
        check=False,
    )
    if installed.stdout == "installed":
        return Path("/bin/busybox")
    download = subprocess.run(
        ["apt-get", "download", "busybox-static"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    debs = list(workdir.glob("busybox-static_*.deb"))
    if download.returncode != 0 or not debs:
        pytest.skip(
            f"cannot get Debian's busybox-static for the test image: {download.stderr.strip()}"
        )
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(workdir / "pkg")], check=True)
    return workdir / "pkg" / "bin" / "busybox"


def _root_filesystem_tar(busybox: Path, out: Path) -> None:
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)

    def add(tar: tarfile.TarFile, name: str, data: bytes | None = None, mode: int = 0o644, **kw):
        info = tarfile.TarInfo(name)
        info.mode = mode
        for key, value in kw.items():
            setattr(info, key, value)
        if data is None:
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    with tarfile.open(out, "w") as tar:
        for folder, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("root", 0o700)):
            add(tar, folder, mode=mode, type=tarfile.DIRTYPE)
        add(tar, "bin/busybox", busybox.read_bytes(), mode=0o755)
        for applet in applets.stdout.split():
            if applet not in ("busybox", "python"):
                add(tar, f"bin/{applet}", type=tarfile.SYMTYPE, linkname="busybox", mode=0o777)
        add(tar, "bin/python", FAKE_PYTHON.encode(), mode=0o755)
        add(tar, "etc/passwd", PASSWD.encode())
        add(tar, "etc/group", GROUP.encode())


def _test_image(client) -> str:
    import docker

    tag = hashlib.sha256((FAKE_PYTHON + PASSWD + GROUP).encode()).hexdigest()[:12]
    image = f"xlearner-test-stage:{tag}"
    try:
        client.images.get(image)
        return image
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryDirectory(prefix="xl-image-") as tmp:
        workdir = Path(tmp)
        rootfs = workdir / "rootfs.tar"
        _root_filesystem_tar(_busybox(workdir), rootfs)
        client.api.import_image_from_file(
            str(rootfs), repository="xlearner-test-stage", tag=tag, changes=["ENV PATH=/bin"]
        )
    return image


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A reachable Docker engine with the busybox test image (skips with the reason if none)."""
    pytest.importorskip("docker", reason="the docker SDK is not installed")
    client = _connect()
    if client is not None:  # an engine already runs: use it, leave it running
        base_url = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        yield DockerEngine(client=client, base_url=base_url, image=_test_image(client))
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker engine answers (docker info fails) and starting dockerd needs root")
    with _private_engine() as engine:
        yield engine


@contextlib.contextmanager
def _private_engine(
    fake_nvidia: bool = False, storage_driver: str = "vfs"
) -> Iterator[DockerEngine]:
    """A ``dockerd`` of our own (root only), with the fake NVIDIA hook on its PATH if asked."""
    if _ensure_dockerd() is None:
        pytest.skip(
            "no Docker engine answers and dockerd is not installed "
            "(scripts/install-system-deps.sh installs Debian's docker.io)"
        )
    root = Path(tempfile.mkdtemp(prefix="xl-dockerd-"))  # short: unix socket paths are limited
    process = client = None
    path = None
    if fake_nvidia:
        (root / "bin").mkdir()
        hook = root / "bin" / NVIDIA_HOOK
        hook.write_text(FAKE_NVIDIA_HOOK)
        hook.chmod(0o755)
        path = f"{root / 'bin'}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    try:
        process, base_url = _start_dockerd(root, path, storage_driver)
        client = _connect(base_url)
        yield DockerEngine(client=client, base_url=base_url, image=_test_image(client))
    finally:
        if client is not None:
            client.close()
        if process is not None:
            _stop_dockerd(process)
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def gpu_docker_engine() -> Iterator[DockerEngine]:
    """A private engine that grants GPU requests without GPUs (the fake NVIDIA hook, see
    :data:`FAKE_NVIDIA_HOOK`): always a second ``dockerd`` of our own, never the running one."""
    pytest.importorskip("docker", reason="the docker SDK is not installed")
    if os.geteuid() != 0:
        pytest.skip("an engine with a fake NVIDIA hook is a dockerd of our own: that needs root")
    with _private_engine(fake_nvidia=True) as engine:
        yield engine


@pytest.fixture(scope="module")
def build_docker_engine() -> Iterator[DockerEngine]:
    """A private engine that stores layers with fuse-overlayfs, for ``docker build``: vfs
    copies each layer whole, and a stage image holds several GB of CUDA libraries.
    ``XLEARNER_TEST_BUILD_DOCKER_HOST``: an engine to use instead, whose build cache
    outlives the session (a second run of the image tests then builds in seconds)."""
    pytest.importorskip("docker", reason="the docker SDK is not installed")
    if base_url := os.environ.get(BUILD_ENGINE_ENV):
        client = _connect(base_url)
        if client is None:
            pytest.fail(f"{BUILD_ENGINE_ENV}={base_url}: no engine answers")
        yield DockerEngine(client=client, base_url=base_url, image=_test_image(client))
        return
    if os.geteuid() != 0:
        pytest.skip("an engine with fuse-overlayfs storage is a dockerd of our own: needs root")
    if shutil.which("fuse-overlayfs") is None or not Path("/dev/fuse").exists():
        pytest.skip("fuse-overlayfs or /dev/fuse is missing (scripts/install-system-deps.sh)")
    with _private_engine(storage_driver="fuse-overlayfs") as engine:
        yield engine
