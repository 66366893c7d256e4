"""Integration tests that boot systemd in systemd-nspawn containers.
Needs root and the packages from scripts/nspawn-deps.sh; select with ``-m nspawn``."""
