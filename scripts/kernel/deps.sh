#!/bin/sh
# Install the host packages the real-kernel tests need (make test-kernel): the kernel
# build tools, QEMU, and what the cached Debian guest root is built with.
# Idempotent: exits quickly when everything is already installed.
set -eu

packages="flex bison bc cpio lz4 gcc make libelf-dev libssl-dev qemu-system-x86 e2fsprogs
debootstrap zstd util-linux"

missing=""
for pkg in $packages; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing="$missing $pkg"
    fi
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "kernel deps: need root to install:$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "kernel deps: apt-get update, then installing$missing" >&2
apt-get update -q
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $missing
