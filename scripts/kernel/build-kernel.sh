#!/bin/sh
# Build (once) the LUO test kernel: Debian's linux-source-7.x, `make tinyconfig` plus
# luo.config. Cached as $CACHE/kernel-<debian version>-<config hash>/bzImage; prints
# that directory. Runs the compiler at nice 19: the machine is shared.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${LIVEUPDATED_TEST_CACHE:-/var/cache/liveupdated-tests}
JOBS=${JOBS:-$(nproc)}
src=$("$HERE/fetch-source.sh")
deb=$(ls "$CACHE"/src/linux-source-*_all.deb | tail -n1)
version=$(basename "$deb" | cut -d_ -f2)
build=$CACHE/build-$version
mkdir -p "$build"
exec 9>"$build/.lock"
flock 9
# The config is derived afresh (seconds) so that its hash names the cached image.
echo "build-kernel: deriving the config (tinyconfig + luo.config) in $build" >&2
make -s -C "$src" O="$build" tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$HERE/luo.config" >/dev/null
make -s -C "$src" O="$build" olddefconfig
for opt in $(grep -oE '^CONFIG_[A-Z0-9_]+=y' "$HERE/luo.config"); do
    grep -qx "$opt" "$build/.config" || { echo "config lost $opt" >&2; exit 1; }
done
hash=$(grep '^CONFIG_' "$build/.config" | sha256sum | cut -c1-16)
out=$CACHE/kernel-$version-$hash
if [ ! -f "$out/bzImage" ]; then
    start=$(date +%s)
    echo "build-kernel: building bzImage $version with $JOBS jobs (15-35 minutes on 2 cores)" >&2
    nice -n 19 make -s -C "$src" O="$build" -j"$JOBS" bzImage >&2
    mkdir -p "$out.tmp"
    cp "$build/arch/x86/boot/bzImage" "$build/.config" "$out.tmp/"
    cp "$src/include/uapi/linux/liveupdate.h" "$out.tmp/"
    echo "$(( $(date +%s) - start ))" >"$out.tmp/build-seconds"
    rm -rf "$out" && mv "$out.tmp" "$out"
    echo "built $out/bzImage in $(cat "$out/build-seconds") s" >&2
fi
echo "$out"
