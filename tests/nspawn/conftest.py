"""Fixtures for the systemd-nspawn integration tests: a cached Debian root and containers.
Skips without root or systemd-nspawn, except under CI=true where that is a failure."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest

from .container import Container, ContainerFactory, StrPath, overlay_root
from .installed import HANDOVER, Installed, build_deb, build_wheels, guest_python_version
from .rootfs import BOOKWORM, SID, Suite, cached_rootfs, tarball_path, tmpfs

TOOLS = ("systemd-nspawn", "nsenter", "setpriv", "mount", "tar", "zstd")


def _unavailable(suite: Suite = BOOKWORM) -> str | None:
    if os.geteuid() != 0:
        return "nspawn tests need root"
    tools = list(TOOLS)
    if not tarball_path(suite).exists():
        tools.append("debootstrap")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"nspawn tests need {', '.join(missing)}: run scripts/nspawn-deps.sh"
    return None


def _root(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    problem = _unavailable(suite)
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{problem} (not skipping: CI is set)")
        pytest.skip(problem)
    with tmpfs(tmp_path_factory.mktemp(f"nspawn-{suite.name}") / "root") as root:
        yield cached_rootfs(root, suite=suite)


@pytest.fixture(scope="session")
def nspawn_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A bootable Debian bookworm root unpacked from the cache; shared, so never write to it."""
    yield from _root(BOOKWORM, tmp_path_factory)


@pytest.fixture(scope="session")
def sid_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A bootable Debian sid root (systemd 262, Python 3.14): shared, never write to it."""
    yield from _root(SID, tmp_path_factory)


@pytest.fixture
def container(nspawn_root: Path, tmp_path: Path) -> Iterator[ContainerFactory]:
    """Factory for containers on private overlays of ``nspawn_root``, stopped at teardown."""
    yield from _containers(nspawn_root, tmp_path)


@pytest.fixture
def sid_container(sid_root: Path, tmp_path: Path) -> Iterator[ContainerFactory]:
    """Factory for containers on private overlays of ``sid_root``, stopped at teardown."""
    yield from _containers(sid_root, tmp_path)


def _containers(nspawn_root: Path, tmp_path: Path) -> Iterator[ContainerFactory]:
    numbers = itertools.count()
    with ExitStack() as stack:

        def make(
            binds: Sequence[tuple[StrPath, str]] = (),
            *,
            boot: bool = True,
            timeout: float = 60.0,
            nspawn_args: Sequence[str] = (),
        ) -> Container:
            scratch = tmp_path / f"container-{next(numbers)}"
            root = stack.enter_context(overlay_root(nspawn_root, scratch))
            new = Container(root, binds, log_path=scratch / "console.log", nspawn_args=nspawn_args)
            stack.callback(new.close)
            if boot:
                new.start(timeout)
            return new

        yield make


@pytest.fixture(scope="session")
def liveupdated_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of this tree and its dependencies, built on the host once a run."""
    return build_wheels(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="session")
def liveupdated_deb(
    nspawn_root: Path, liveupdated_wheels: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """liveupdated_<version>_<arch>.deb of this tree, its venv built on the guest's python3."""
    return build_deb(tmp_path_factory.mktemp("packages"), liveupdated_wheels, nspawn_root)


@pytest.fixture(scope="session")
def sid_wheels(sid_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels for sid's Python, from the host: liveupdated and the pure dependencies built
    here, the compiled one (dbus-fast) downloaded as the manylinux wheel for that Python."""
    return build_wheels(tmp_path_factory.mktemp("sid-wheels"), guest_python_version(sid_root))


@pytest.fixture(scope="session")
def sid_deb(sid_root: Path, sid_wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb of this tree for sid: its venv built on sid's own python3."""
    return build_deb(tmp_path_factory.mktemp("sid-packages"), sid_wheels, sid_root)


@pytest.fixture
def sid_installed(sid_container: ContainerFactory, sid_deb: Path, tmp_path: Path) -> Installed:
    """A booted sid container with the .deb installed (and the same handover bind mount
    as bookworm's, which the fdstore backend never writes to)."""
    handover = tmp_path / "handover"
    handover.mkdir(mode=0o700)
    return Installed.install(sid_container([(handover, HANDOVER)]), sid_deb, handover)


@pytest.fixture
def installed(container: ContainerFactory, liveupdated_deb: Path, tmp_path: Path) -> Installed:
    """A booted container with the .deb installed, its handover area bind-mounted from
    the host (so it outlives the container's reboots, as the kexec'd memory would)."""
    handover = tmp_path / "handover"
    handover.mkdir(mode=0o700)
    return Installed.install(container([(handover, HANDOVER)]), liveupdated_deb, handover)
