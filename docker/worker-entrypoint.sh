#!/bin/sh
# Start the Prefect Docker worker, after checking that this (non-root) user can use the
# Docker socket: its group id on the host must be one of ours (compose: group_add with
# DOCKER_GID from .env), else every flow run would fail later with "permission denied".
set -eu
socket=${DOCKER_HOST:-unix:///var/run/docker.sock}
socket=${socket#unix://}
if [ ! -S "$socket" ]; then
    echo "xlearner-worker: no Docker socket at $socket; mount the host's /var/run/docker.sock" >&2
    exit 1
fi
if [ ! -w "$socket" ] || [ ! -r "$socket" ]; then
    gid=$(stat -c %g "$socket")
    echo "xlearner-worker: user $(id -u) (groups $(id -G)) cannot use $socket (group id $gid);" \
        "set DOCKER_GID=$gid in .env and run: docker compose up -d prefect-worker" >&2
    exit 1
fi
exec prefect worker start --pool "${XLEARNER_WORK_POOL:-xlearner-docker}" --type docker \
    --with-healthcheck "$@"
