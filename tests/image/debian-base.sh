#!/usr/bin/env bash
# Builds a Debian bookworm base with python3 and imports it into podman as $1 (e.g.
# localhost/flexwebchat-base:bookworm), standing in for python:3.11-slim-bookworm, which no
# reachable registry serves (../shared/reference/container-builds.md). The rootfs tarball is
# cached under ~/.cache/flexwebchat/ (about 1 minute to debootstrap, then reused on this machine).
set -euo pipefail
image="$1"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/flexwebchat"
tarball="$cache/debian-bookworm-python3.tar"
if podman image exists "$image"; then exit 0; fi
if [ ! -s "$tarball" ]; then
  mkdir -p "$cache"
  rootfs="$(mktemp -d "$cache/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  # pip inside the build reaches the registries through this machine's trust store.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
podman import --quiet "$tarball" "$image" >/dev/null
