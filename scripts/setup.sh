#!/usr/bin/env bash
# Sets up a development machine from nothing: apt packages, then .venv with the project.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(dbus dbus-broker libglib2.0-bin python3-venv python3-dbus scdoc)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    echo "setup: apt-get update, then installing ${missing[*]}" >&2
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $python" >&2
    "$python" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "setup: installing liveupdated and its test tools into .venv (pip)" >&2
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
