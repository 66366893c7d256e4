#!/bin/sh
# Build the guest's boot disk image (a 1 MiB raw disk) from counter.S: guest/build.sh [OUT] (default
# guest/counter.img). Needs GNU binutils (as, ld); Debian: apt-get install binutils.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/counter.img}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
as --32 -o "$work/counter.o" "$here/counter.S"
ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o "$work/counter.bin" "$work/counter.o"
size=$(stat -c %s "$work/counter.bin")
[ "$size" -eq 512 ] || { echo "build.sh: boot sector is $size bytes, not 512" >&2; exit 1; }
# SeaBIOS will not boot a disk of one sector: pad it (sparse) to 1 MiB.
truncate -s 1M "$work/counter.bin"
mv "$work/counter.bin" "$out"
echo "$out"
