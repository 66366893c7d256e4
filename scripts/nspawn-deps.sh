#!/usr/bin/env bash
# Install the host packages the systemd-nspawn integration tests need: packaging/build-deb.sh
# renders the manual pages (scdoc) and strips the extension modules (binutils) beside
# dpkg-deb and unshare, which every Debian has; the package is checked with lintian.
# Idempotent: exits quickly when everything is already installed.
set -euo pipefail

packages=(systemd-container debootstrap zstd scdoc binutils lintian)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ $status != installed ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "nspawn-deps: need root to install: ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
