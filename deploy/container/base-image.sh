#!/usr/bin/env bash
# Makes a Debian 12 base image from Debian's packages, without any container registry:
#   debootstrap --variant=minbase bookworm DIR, then `tar -C DIR -c . | podman import - NAME`.
# Usage: deploy/container/base-image.sh [NAME] [EXTRA_PACKAGES]
#   NAME            default localhost/ringlb-base:bookworm
#   EXTRA_PACKAGES  comma-separated, default iproute2 (what `ringlb setup` runs)
# Needs root, debootstrap and podman. MIRROR overrides the Debian mirror.
set -euo pipefail
name=${1:-localhost/ringlb-base:bookworm}
extra=${2:-iproute2}
mirror=${MIRROR:-http://deb.debian.org/debian}
dir=$(mktemp -d /var/tmp/ringlb-base.XXXXXX)
trap 'rm -rf --one-file-system "$dir"' EXIT
debootstrap --variant=minbase --include="$extra" bookworm "$dir" "$mirror" >"$dir.log" 2>&1 \
    || { tail -n 20 "$dir.log"; rm -f "$dir.log"; exit 1; }
rm -f "$dir.log"
# An image needs no apt lists or caches.
rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb
tar --numeric-owner -C "$dir" -c . | podman import \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.opencontainers.image.description=\"Debian 12 minbase + $extra, made by debootstrap\"" \
    - "$name" >/dev/null
echo "$name"
