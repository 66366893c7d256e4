#!/usr/bin/env bash
# A Debian package of liveupdated, laid out by install.sh, its venv built on Debian's
# /usr/bin/python3.
#
#   build-deb.sh OUTDIR --wheels DIR [--sysroot DIR]
#
# --wheels DIR    from build-wheels.sh (run on the host: pip in a chroot may not reach
#                 the index)
# --sysroot DIR   a Debian root (e.g. debootstrap's bookworm) to build the venv in: it is
#                 used through a throwaway overlay in a private mount namespace, never
#                 written to. Without it the venv is built on this machine, which must then
#                 be the target Debian release. Needs root either way (dpkg-deb is given
#                 root-owned files).
# Prints the path of the .deb.
#
# The package's Maintainer (control), its copyright holder and the changelog's signature
# lines name whoever builds it, never an address made up here:
#   LIVEUPDATED_MAINTAINER="Full Name <address>"   if set, else
#   DEBFULLNAME and DEBEMAIL (as dch(1) reads them)   if both are set, else
#   "liveupdated local build <nobody@liveupdated.invalid>" (.invalid never resolves:
#   RFC 2606), which says that no one maintains this build.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
usage() { echo "usage: $0 OUTDIR --wheels DIR [--sysroot DIR]" >&2; exit 2; }
(($# >= 1)) || usage
out=$1; shift
wheels="" sysroot=""
while (($#)); do
    case $1 in
        --wheels) wheels=$(cd "$2" && pwd); shift 2 ;;
        --sysroot) sysroot=$(cd "$2" && pwd); shift 2 ;;
        *) usage ;;
    esac
done
[[ -n $wheels ]] || usage

NEUTRAL_MAINTAINER="liveupdated local build <nobody@liveupdated.invalid>"
if [[ -n ${LIVEUPDATED_MAINTAINER:-} ]]; then
    maintainer=$LIVEUPDATED_MAINTAINER
elif [[ -n ${DEBFULLNAME:-} && -n ${DEBEMAIL:-} ]]; then
    maintainer="$DEBFULLNAME <$DEBEMAIL>"
else
    maintainer=$NEUTRAL_MAINTAINER
fi
# One "Name <user@host>", nothing sed's replacement would read as its own syntax.
if [[ ! $maintainer =~ ^[^\<\>@|\\\&]+\ \<[^\<\>@|\\\&[:space:]]+@[^\<\>@|\\\&[:space:]]+\>$ ]]; then
    echo "build-deb: maintainer '$maintainer' is not 'Full Name <user@host>'" \
        "(LIVEUPDATED_MAINTAINER, or DEBFULLNAME and DEBEMAIL)" >&2
    exit 2
fi

wheel=$(cd "$wheels" && ls liveupdated-*-py3-none-any.whl)
version=${wheel#liveupdated-}
version=${version%%-*}
arch=$(dpkg --print-architecture)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$work/pkg
mkdir -p "$pkg"

guest_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8)
if [[ -n $sysroot ]]; then
    mkdir -p "$work"/{upper,work,merged}
    # shellcheck disable=SC2016  # expanded by the inner shell
    unshare --mount --propagation private -- bash -euo pipefail -c '
        sysroot=$1 work=$2 src=$3 wheels=$4; shift 4
        mount -t overlay overlay \
            -o "lowerdir=$sysroot,upperdir=$work/upper,workdir=$work/work" "$work/merged"
        for dir in src wheels pkg; do mkdir -p "$work/merged/mnt/$dir"; done
        mount --bind -o ro "$src" "$work/merged/mnt/src"
        mount --bind -o ro "$wheels" "$work/merged/mnt/wheels"
        mount --bind "$work/pkg" "$work/merged/mnt/pkg"
        mount -t proc proc "$work/merged/proc"
        exec chroot "$work/merged" "$@" /mnt/src/packaging/install.sh \
            --wheels /mnt/wheels --root /mnt/pkg --no-man
    ' build-deb "$sysroot" "$work" "$src" "$wheels" "${guest_env[@]}"
else
    "${guest_env[@]}" "$src/packaging/install.sh" --wheels "$wheels" --root "$pkg" --no-man
fi

# Manual pages, rendered here (the sysroot has no scdoc), compressed as Debian ships them.
command -v scdoc >/dev/null || { echo "build-deb: needs scdoc (apt install scdoc)" >&2; exit 1; }
for page in "$src"/man/*.scd; do
    name=${page##*/}; name=${name%.scd}; section=${name##*.}
    mkdir -p "$pkg/usr/share/man/man$section"
    scdoc <"$page" | gzip -9n >"$pkg/usr/share/man/man$section/$name.gz"
    chmod 0644 "$pkg/usr/share/man/man$section/$name.gz"
done
# Extension modules without their symbols, as dh_strip leaves them.
find "$pkg" -type f -name '*.so' -exec strip --remove-section=.comment \
    --remove-section=.note --strip-unneeded {} +
doc=$pkg/usr/share/doc/liveupdated
mkdir -p "$doc"
sed "s|@MAINTAINER@|$maintainer|" "$src/packaging/debian/copyright" >"$doc/copyright"
chmod 0644 "$doc/copyright"
# The changelog's latest entry is this release.
released=$(sed -n '1s/^liveupdated (\([^)]*\)).*/\1/p' "$src/packaging/debian/changelog")
if [[ $released != "$version" ]]; then
    echo "build-deb: packaging/debian/changelog's latest entry is ${released:-none}," \
        "the wheel is $version" >&2
    exit 1
fi
sed "s|@MAINTAINER@|$maintainer|" "$src/packaging/debian/changelog" | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"
mkdir -p "$pkg/DEBIAN"
install -m 0755 -t "$pkg/DEBIAN" "$src"/packaging/debian/{postinst,prerm,postrm}
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
# The venv links to the Python it was built on and carries extensions compiled for it:
# the package depends on that minor version (3.11 on bookworm, 3.14 on sid).
pyver=$(sed -n 's/^version_info *= *\([0-9]*\)\.\([0-9]*\).*/\1.\2/p' \
    "$pkg/usr/lib/liveupdated/pyvenv.cfg")
[[ -z $pyver ]] && pyver=$(sed -n 's/^version *= *\([0-9]*\)\.\([0-9]*\).*/\1.\2/p' \
    "$pkg/usr/lib/liveupdated/pyvenv.cfg")
[[ $pyver =~ ^3\.[0-9]+$ ]] || { echo "build-deb: no Python version in pyvenv.cfg" >&2; exit 1; }
pynext=3.$((${pyver#3.} + 1))
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@PYTHON@/$pyver/" -e "s/@PYTHON_NEXT@/$pynext/" -e "s|@MAINTAINER@|$maintainer|" \
    "$src/packaging/debian/control.in" >"$pkg/DEBIAN/control"

(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) >"$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/md5sums"

mkdir -p "$out"
deb=$(cd "$out" && pwd)/liveupdated_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zgzip -z6 --build "$pkg" "$deb" >/dev/null
echo "$deb"
