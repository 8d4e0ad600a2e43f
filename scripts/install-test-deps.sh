#!/usr/bin/env bash
# Install what the test suite needs, when missing (the README's test command runs it first).
# Debian 12: apt packages for the real upstream registry, skopeo, dockerd, containerd, podman,
# chromium, redis, tinyproxy, kubectl (deploy/kubernetes), systemd-analyze (deploy/systemd),
# mmdebstrap (a base for the container image test) and docker-compose (deploy/compose); pip: the
# project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
command -v skopeo >/dev/null || need_apt+=(skopeo)
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v containerd >/dev/null || need_apt+=(containerd)
command -v runc >/dev/null || need_apt+=(runc)
command -v curl >/dev/null || need_apt+=(curl)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v tinyproxy >/dev/null || need_apt+=(tinyproxy)  # the egress-proxy tests
command -v podman >/dev/null || need_apt+=(podman)
command -v kubectl >/dev/null || need_apt+=(kubernetes-client)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v mmdebstrap >/dev/null || need_apt+=(mmdebstrap)
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
if ((${#need_apt[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
