#!/usr/bin/env bash
# Install the Debian packages the test suite needs, only those that are missing.
#
#   docker.io        the Docker engine (dockerd) for the Docker runner tests
#   docker-compose   `docker-compose config` validates docker-compose.yml
#   fuse-overlayfs, debootstrap   building the project's images in the Docker pool test
#                    (layers without whole copies; the base image, no registry here)
#   chromium, chromium-driver   browser tests of the Prefect / MLflow UIs
#
# Idempotent: a second run installs nothing. Never fails the build: without root or
# apt-get it warns and exits 0, and the tests that need a missing tool skip with a reason.
# Usage: scripts/install-system-deps.sh [package ...]   (default: all of the above)
set -u

PACKAGES=("$@")
if [ ${#PACKAGES[@]} -eq 0 ]; then
    PACKAGES=(docker.io docker-compose fuse-overlayfs debootstrap chromium chromium-driver)
fi

warn() { echo "install-system-deps: WARNING: $*" >&2; }

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    warn "apt-get is not available; not installing ${PACKAGES[*]} (tests that need them will skip)"
    exit 0
fi

missing=()
for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$package")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-system-deps: all present: ${PACKAGES[*]}"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    warn "not root; missing Debian packages: ${missing[*]} (install them with: sudo apt-get install -y ${missing[*]})"
    exit 0
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq; then
    warn "apt-get update failed; not installing ${missing[*]}"
    exit 0
fi
# --no-install-recommends keeps docker.io from pulling in git/xz extras we do not use.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    warn "apt-get install ${missing[*]} failed (tests that need them will skip)"
    exit 0
fi
echo "install-system-deps: done"
