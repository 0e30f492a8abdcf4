#!/usr/bin/env bash
# Stand-ins for the compose file's base images on a machine that reaches no image registry:
# Debian bookworm from debootstrap (with this machine's CA certificates, for HTTPS through its
# proxy), then `python:3.11-slim` (Debian's Python 3.11 in a venv on PATH) and `redis:7-alpine`
# (Debian's redis-server), so that docker/Dockerfile and docker-compose.yml build unchanged.
# Images already present are kept. Needs root, debootstrap and a running Docker engine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have distill-base:bookworm; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" >/dev/null
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - distill-base:bookworm >/dev/null
fi
have python:3.11-slim || docker build --network host -q -t python:3.11-slim -f "$here/python.Dockerfile" "$here" >/dev/null
have redis:7-alpine || docker build --network host -q -t redis:7-alpine -f "$here/redis.Dockerfile" "$here" >/dev/null
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(distill-base|python|redis):'
