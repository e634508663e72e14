#!/usr/bin/env bash
# A local stand-in for docker/Dockerfile.cpu's base image (python:3.11.14-slim-trixie), for a
# machine that reaches Debian's package mirror but no image registry: Debian 12 (minbase) with
# Debian's Python 3.11, in a venv at /opt/venv that is first on PATH, so that the Dockerfile's
# `python` and `pip` are a Python 3.11 that pip may install into (Debian's own python3 refuses
# system-wide installs, PEP 668), and groupadd/useradd (passwd). Imported into podman as one
# layer. tests/integration/test_container.py runs it when the image is missing.
#
#   bash launch/container_base.sh [IMAGE]        (default: localhost/ftrain-base:bookworm-py311)
#
# Needs root, debootstrap and podman. PODMAN may carry podman's global options (the test gives
# it its --storage-driver); MIRROR another Debian mirror.
set -euo pipefail

image=${1:-localhost/ftrain-base:bookworm-py311}
podman=${PODMAN:-podman}
mirror=${MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/ftrain-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase --include=passwd,python3,python3-venv bookworm "$root" "$mirror"
chroot "$root" python3 -m venv /opt/venv
# What the image does not need at run time: the packages' downloads and lists.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# shellcheck disable=SC2086  # $podman: the command and its global options
tar -C "$root" -c . | $podman import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' \
    - "$image"
