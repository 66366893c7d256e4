#!/bin/sh
# Run the QEMU of another Debian root (a sid root: bookworm's QEMU 7.2 has no cpr-reboot
# migration mode) with the host's kernel interfaces, keeping every inherited fd:
#
#   guest/qemu-in-root.sh ROOT [DIR...] -- QEMU-ARGS...
#
# /proc, /dev, /sys and each DIR are bind-mounted at the same paths inside ROOT, in a
# mount namespace of its own that goes away with QEMU, so paths (the QMP socket, the disk
# image, /proc/self/fd/N) mean the same inside and out. Needs root.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 ROOT [DIR...] -- QEMU-ARGS..." >&2; exit 2; }
root=$1
shift
dirs=
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    dirs="$dirs $1"
    shift
done
[ $# -gt 0 ] || { echo "$0: missing -- before QEMU's arguments" >&2; exit 2; }
shift
[ -x "$root/usr/bin/qemu-system-x86_64" ] || {
    echo "$0: no qemu-system-x86_64 in $root" >&2; exit 69; }
exec unshare --mount --propagation private -- sh -c '
    root=$1; dirs=$2; shift 2
    for d in /proc /dev /sys $dirs; do
        mkdir -p "$root$d" && mount --rbind "$d" "$root$d"
    done
    exec chroot "$root" qemu-system-x86_64 "$@"
' qemu-in-root "$root" "$dirs" "$@"
