#!/usr/bin/env bash
# Build a local Python 3.11 base image without a registry: debootstrap a minimal Debian bookworm and
# `docker import` it. Use it where no registry is reachable (the Dockerfile defaults to python:3.11-slim):
#
#   scripts/build-base-image.sh [TAG]            # default TAG: local/python:3.11-bookworm
#   docker-compose build --build-arg BASE_IMAGE=local/python:3.11-bookworm   (or BASE_IMAGE= in .env)
#
# Needs root, debootstrap and a running Docker engine (DOCKER_HOST honoured). Cached: does nothing when the
# tag exists, unless FORCE=1. Environment:
#   DEBIAN_MIRROR   the mirror apt uses (default http://deb.debian.org/debian)
#   HOST_CA_BUNDLE  CA bundle copied into the image, for TLS-intercepting proxies
#                   (default /etc/ssl/certs/ca-certificates.crt when it exists; set empty to skip)
set -euo pipefail

TAG=${1:-local/python:3.11-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${HOST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}

if [[ -z ${FORCE:-} ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "build-base-image: $TAG exists (FORCE=1 rebuilds)"
    exit 0
fi
[[ $(id -u) == 0 ]] || { echo "build-base-image: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-base-image: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }

start=$SECONDS
rootfs=$(mktemp -d /tmp/karma-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "build-base-image: debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"

# Behave like python:3.11-slim: pip may install system-wide (the Dockerfile uses a venv anyway).
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
if [[ -n $CA_BUNDLE && -f $CA_BUNDLE ]]; then
    cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*

tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "build-base-image: $TAG built in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
