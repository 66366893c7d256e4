#!/bin/sh
# Download and unpack Debian's linux-source-7.x from the unstable suite, once, into the
# test cache. A private apt directory keeps the machine's own sources untouched; its
# mirror is the host's own Debian mirror from its apt sources, or
# $LIVEUPDATED_DEBIAN_MIRROR (scripts/debian-mirror.sh).
# Prints the unpacked source directory.
set -eu
CACHE=${LIVEUPDATED_TEST_CACHE:-/var/cache/liveupdated-tests}
PKG=${LUO_KERNEL_PACKAGE:-linux-source-7.2}
APT=$CACHE/apt-unstable
SRC=$CACHE/src
mkdir -p "$APT/etc/parts" "$APT/lists/partial" "$SRC"
set -- -o "Dir::Etc::SourceList=$APT/etc/unstable.sources" \
    -o "Dir::Etc::SourceParts=$APT/etc/parts" -o "Dir::State::Lists=$APT/lists" \
    -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
exec 9>"$SRC/.lock"
flock 9
deb=$(ls "$SRC"/"${PKG}"_*_all.deb 2>/dev/null | tail -n1 || true)
if [ -z "$deb" ]; then  # a mirror is needed only to download
    mirror=$("$(dirname "$0")/../debian-mirror.sh")
    cat >"$APT/etc/unstable.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: unstable
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    echo "fetch-source: downloading $PKG from Debian unstable ($mirror) into $SRC" >&2
    apt-get -q "$@" update >&2
    (cd "$SRC" && apt-get -q "$@" download "$PKG" >&2)
    deb=$(ls "$SRC"/"${PKG}"_*_all.deb | tail -n1)
fi
tree=$SRC/$PKG
if [ ! -f "$tree/Makefile" ]; then
    echo "fetch-source: unpacking $PKG into $tree" >&2
    rm -rf "$SRC/deb" "$tree"
    dpkg-deb -x "$deb" "$SRC/deb"
    tar -C "$SRC" -xf "$SRC/deb/usr/src/$PKG.tar.xz"
    rm -rf "$SRC/deb"
fi
echo "$tree"
