#!/usr/bin/env bash
# Wheels of liveupdated and of every dependency, for install.sh --wheels on a machine (or
# container) that cannot reach the package index.
#
#   build-wheels.sh OUTDIR [PYTHON]
#
# PYTHON (default: .venv/bin/python, else python3) must be the target's Python version
# (3.11 for Debian bookworm): the compiled dependencies are built for it.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
if (($# < 1 || $# > 2)); then echo "usage: $0 OUTDIR [PYTHON]" >&2; exit 2; fi
out=$1
python=${2:-}
if [[ -z $python ]]; then
    if [[ -x $src/.venv/bin/python ]]; then python=$src/.venv/bin/python; else python=python3; fi
fi
mkdir -p "$out"
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$out" "$src"
ls "$out"/liveupdated-*.whl >/dev/null
