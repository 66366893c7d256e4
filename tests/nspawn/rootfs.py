"""Bootable Debian root file systems for the systemd-nspawn integration tests.
Built once with debootstrap and cached as a zstd tarball keyed on suite and packages:
bookworm (systemd 252) and sid (systemd 262, which carries a unit's fd store across
soft-reboot)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "iproute2",
    "procps",
    "libglib2.0-bin",
)
# Bump when _customize() changes so that stale cached roots are rebuilt.
REVISION = "1"


@dataclass(frozen=True)
class Suite:
    """A Debian release to debootstrap, with the packages the tests need in it."""

    name: str
    packages: tuple[str, ...]
    revision: str = REVISION


BOOKWORM = Suite(SUITE, PACKAGES)
# python3 (not -minimal): the venv needs ensurepip's pip wheel (python3-venv) to install.
# gcc, libc6-dev, libsystemd-dev, pkg-config: test_c_vmm.py builds examples/vmm.c there.
# dbus-broker: installed, not enabled; test_broker.py makes it the system bus.
SID = Suite(
    "sid",
    ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps",
     "libglib2.0-bin", "polkitd", "libpam-systemd",
     "gcc", "libc6-dev", "libsystemd-dev", "pkg-config",
     "dbus-broker"),
)
SUITES = {suite.name: suite for suite in (BOOKWORM, SID)}
HOSTNAME = "liveupdated-test"
CACHE_DIR = Path("/var/cache/liveupdated-tests")
MIRROR_HELPER = Path(__file__).resolve().parents[2] / "scripts" / "debian-mirror.sh"
# Units that cannot work in a container sharing the host's network and kernel.
MASKED_UNITS = ("systemd-networkd-wait-online.service",)

_TAR_FLAGS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


class RootfsError(RuntimeError):
    """Building or unpacking the root file system failed."""


def cache_key(suite: Suite = BOOKWORM) -> str:
    """Return the cache key for a suite, its package list and setup revision."""
    text = "\n".join([suite.name, ",".join(sorted(suite.packages)), suite.revision])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tarball_path(suite: Suite = BOOKWORM, cache_dir: Path = CACHE_DIR) -> Path:
    """Where the cached root of `suite` lives (bookworm's name predates the others)."""
    prefix = "rootfs" if suite == BOOKWORM else f"rootfs-{suite.name}"
    return cache_dir / f"{prefix}-{cache_key(suite)}.tar.zst"


def cached_rootfs(
    dest_dir: Path, cache_dir: Path = CACHE_DIR, suite: Suite = BOOKWORM
) -> Path:
    """Unpack the cached root into dest_dir, building the cache first if needed."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    tarball = tarball_path(suite, cache_dir)
    if not tarball.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(cache_dir / f"{tarball.name}.lock"):
            if not tarball.exists():
                _build_tarball(tarball, suite)
    _run(
        [
            "tar",
            "--extract",
            "--zstd",
            "--preserve-permissions",
            *_TAR_FLAGS,
            "-C",
            str(dest_dir),
            "-f",
            str(tarball),
        ]
    )
    return dest_dir


@contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    """A tmpfs on path while in the context: a root unpacks there in about a second, and
    goes with one umount (deleting it from disk took longer than the tests using it)."""
    path.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(path)])
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def host_mirror() -> str:
    """The Debian mirror to debootstrap from: LIVEUPDATED_DEBIAN_MIRROR, else the host's
    own from its apt sources (scripts/debian-mirror.sh, shared with the shell scripts).
    RootfsError with the helper's one line when there is none."""
    result = subprocess.run(
        [str(MIRROR_HELPER)], check=False, stdin=subprocess.DEVNULL, capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise RootfsError(result.stderr.strip() or f"{MIRROR_HELPER} printed no mirror")
    return result.stdout.strip()


def _build_tarball(tarball: Path, suite: Suite) -> None:
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=tarball.parent))
    try:
        partial = build / tarball.name
        # Built in memory: dpkg fsyncs every file it unpacks, which is slow on a busy disk.
        with tmpfs(build / "root") as root:
            try:
                _run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        f"--include={','.join(suite.packages)}",
                        suite.name,
                        str(root),
                        host_mirror(),
                    ]
                )
            except RootfsError as exc:
                log = root / "debootstrap/debootstrap.log"
                detail = "\n".join(log.read_text().splitlines()[-30:]) if log.exists() else ""
                _unmount_under(root)
                raise RootfsError(f"{exc}\n{detail}") from None
            _customize(root, suite)
            _run(
                [
                    "tar",
                    "--create",
                    "--use-compress-program=zstd -T0",
                    *_TAR_FLAGS,
                    "-C",
                    str(root),
                    "-f",
                    str(partial),
                    ".",
                ]
            )
        os.rename(partial, tarball)
    finally:
        _unmount_under(build)
        shutil.rmtree(build, ignore_errors=True)


def _customize(root: Path, suite: Suite) -> None:
    # An empty machine-id: every container gets its own id at boot, without
    # first-boot semantics (no systemd-firstboot prompts on the console).
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    (root / "etc/hostname").write_text(f"{HOSTNAME}\n")
    (root / "etc/hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        if not link.is_symlink():
            link.symlink_to("/dev/null")
    for pattern in (
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/lib/apt/lists/*_*",
        "var/log/*.log",
    ):
        for path in root.glob(pattern):
            path.unlink()


def _unmount_under(path: Path) -> None:
    """Lazily unmount anything left mounted below path (e.g. by a failed debootstrap)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(cmd: list[str]) -> None:
    result = subprocess.run(
        cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise RootfsError(f"{cmd[0]} exited with {result.returncode}:\n{tail}")
