#!/bin/sh
# A Debian sid root with QEMU (11.x) and binutils, for running the QEMU adapter on a
# bookworm host (whose QEMU 7.2 has no cpr-reboot migration mode):
#
#   guest/sid-root.sh [DEST]      (default /var/tmp/liveupdated-qemu-root; prints DEST)
#
# Built once with debootstrap (about a minute) and cached as a zstd tarball under
# /var/cache/liveupdated-tests keyed on its package list; DEST is unpacked from the cache
# when it holds no QEMU yet. The mirror is the host's own Debian mirror from its apt
# sources, or $LIVEUPDATED_DEBIAN_MIRROR (scripts/debian-mirror.sh). Needs root,
# debootstrap and zstd (scripts/nspawn-deps.sh installs them).
set -eu
PACKAGES="qemu-system-x86,binutils"
REVISION=1
dest=${1:-/var/tmp/liveupdated-qemu-root}
cache=/var/cache/liveupdated-tests
key=$(printf 'sid\n%s\n%s\n' "$PACKAGES" "$REVISION" | sha256sum | cut -c1-16)
tarball=$cache/qemu-root-sid-$key.tar.zst

if [ -x "$dest/usr/bin/qemu-system-x86_64" ]; then
    echo "$dest"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "sid-root.sh: needs root" >&2; exit 1; }

# The host's own Debian mirror, or LIVEUPDATED_DEBIAN_MIRROR (one line and exit 1: none).
mirror=$("$(dirname "$0")/../scripts/debian-mirror.sh")

mkdir -p "$cache"
exec 9>"$tarball.lock"
flock 9
if [ ! -e "$tarball" ]; then
    build=$(mktemp -d "$cache/.qemu-root-XXXXXX")
    trap 'umount -R "$build/root" 2>/dev/null || true; rm -rf "$build"' EXIT
    mkdir "$build/root"
    mount -t tmpfs -o mode=0755 tmpfs "$build/root"  # dpkg's fsyncs are slow on disk
    echo "sid-root.sh: debootstrap sid with $PACKAGES from $mirror (about a minute)" >&2
    if ! debootstrap --variant=minbase --include="$PACKAGES" sid "$build/root" "$mirror" \
            >"$build/debootstrap.log" 2>&1; then
        tail -n 30 "$build/debootstrap.log" >&2
        exit 1
    fi
    rm -rf "$build/root/var/cache/apt/archives/"*.deb "$build/root/var/lib/apt/lists/"*_*
    tar --create --use-compress-program='zstd -T0' --numeric-owner -C "$build/root" \
        -f "$build/root.tar.zst" .
    mv "$build/root.tar.zst" "$tarball"
fi
mkdir -p "$dest"
tar --extract --zstd --numeric-owner -C "$dest" -f "$tarball"
echo "$dest"
