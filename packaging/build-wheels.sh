#!/usr/bin/env bash
# Wheels of liveupdated and of every dependency, for install.sh --wheels on a machine (or
# container) that cannot reach the package index.
#
#   build-wheels.sh OUTDIR [PYTHON] [--python-version X.Y]
#
# PYTHON (default: .venv/bin/python, else python3) builds the wheels. The compiled
# dependencies (dbus-fast) are built for its version; --python-version X.Y (the target's
# Python, e.g. 3.14 for Debian sid when PYTHON is bookworm's 3.11) also downloads each
# compiled one, at the same version, as a manylinux wheel for CPython X.Y.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
usage() { echo "usage: $0 OUTDIR [PYTHON] [--python-version X.Y]" >&2; exit 2; }
out="" python="" target=""
while (($#)); do
    case $1 in
        --python-version) (($# >= 2)) || usage; target=$2; shift 2 ;;
        -*) usage ;;
        *) if [[ -z $out ]]; then out=$1; elif [[ -z $python ]]; then python=$1; else usage; fi
           shift ;;
    esac
done
[[ -n $out ]] || usage
if [[ -z $python ]]; then
    if [[ -x $src/.venv/bin/python ]]; then python=$src/.venv/bin/python; else python=python3; fi
fi
mkdir -p "$out"
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$out" "$src"
ls "$out"/liveupdated-*.whl >/dev/null
if [[ -n $target ]]; then
    [[ $target =~ ^3\.[0-9]+$ ]] || usage
    abi=cp${target/./}
    shopt -s nullglob
    for wheel in "$out"/*.whl; do
        name=${wheel##*/}
        case $name in *-none-any.whl) continue ;; esac  # pure Python: any version takes it
        project=${name%%-*} version=${name#*-}
        version=${version%%-*}
        "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --dest "$out" --python-version "$target" \
            --implementation cp --abi "$abi" --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            "$project==$version"
    done
fi
