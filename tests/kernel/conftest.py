"""Fixtures of the real-kernel tests: the LUO kernel (built once, cached) and the guest disk.
They need root, gcc and QEMU; without them the tests skip, except under CI=true."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .image import REPO, build_image

BUILD = REPO / "scripts" / "kernel" / "build-kernel.sh"
TIMINGS: dict[str, float] = {}


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    missing = [t for t in ("qemu-system-x86_64", "mkfs.ext4", "gcc", "unshare", "zstd")
               if shutil.which(t) is None]
    if missing:
        return f"kernel tests need {', '.join(missing)} (apt-get install qemu-system-x86)"
    return None


@pytest.fixture(scope="session")
def luo_kernel() -> Path:
    """The cached build directory of the LUO kernel: bzImage, .config, build-seconds."""
    problem = _unavailable()
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{problem} (not skipping: CI is set)")
        pytest.skip(problem)
    out = subprocess.run([BUILD], check=True, stdout=subprocess.PIPE, text=True).stdout
    built = Path(out.strip().splitlines()[-1])
    TIMINGS["kernel build (cached), s"] = float((built / "build-seconds").read_text())
    return built


@pytest.fixture(scope="session")
def guest_image(luo_kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("guest")
    started = time.monotonic()
    image = build_image(work, luo_kernel / "bzImage")
    TIMINGS["guest image build, s"] = time.monotonic() - started
    yield image
    image.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("LUO kernel test timings")
        for name, value in TIMINGS.items():
            terminalreporter.write_line(f"{name:58} {value:8.1f}")


@pytest.fixture(scope="session")
def sid_guest_image(luo_kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The sid guest's disk (systemd 262 as PID 1): sid_image.py."""
    from .sid_image import build_sid_image

    work = tmp_path_factory.mktemp("guest-sid")
    started = time.monotonic()
    image = build_sid_image(work, luo_kernel / "bzImage")
    TIMINGS["sid guest image build, s"] = time.monotonic() - started
    yield image
    image.unlink(missing_ok=True)
