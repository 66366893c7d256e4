"""The fdstore backend with systemd's kexec as the reboot: Reboot is refused while no kexec
kernel is loaded. Seen on the LUO kernel with systemd 262: without one, systemd-shutdown
preserves the fd stores, fails the kexec ("Failed to kexec: Invalid argument"), reboots
plainly, and every store is lost. (Default suite: no kernel, no QEMU.)"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from liveupdated.backends import fdstore, luo_uapi
from liveupdated.backends.fdstore import FdStoreBackend
from liveupdated.core.errors import WrongState
from liveupdated.core.orchestrator import FdEntry


@pytest.fixture
def fds(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[tuple[str, str], int]]:
    def pid1(**asked: Any) -> dict[str, Any]:
        return {"FileDescriptorStorePreserve": "yes"}

    monkeypatch.setattr(fdstore, "pid1", pid1)
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.write(fd, b"x" * 4096)
    yield {("vm", "ram"): fd}
    os.close(fd)


def entries_of(fds: dict[tuple[str, str], int]) -> dict[tuple[str, str], FdEntry]:
    return {key: FdEntry(key[1], "memfd", (), 4096, key[1], 0) for key in fds}


@pytest.mark.parametrize("loaded", [False, True])
def test_reboot_by_kexec_needs_a_loaded_kernel(
    fds: dict[tuple[str, str], int], monkeypatch: pytest.MonkeyPatch, loaded: bool
) -> None:
    monkeypatch.setattr(luo_uapi, "kexec_loaded", lambda: loaded)
    backend = FdStoreBackend(kexec=True)
    backend.prepare_handover(fds, entries_of(fds))  # Prepare: the kernel may come later
    if loaded:
        assert backend.write_handover(fds, entries_of(fds), "boot", lambda n: None) == 4096
    else:
        with pytest.raises(WrongState, match="kexec_loaded"):
            backend.write_handover(fds, entries_of(fds), "boot", lambda n: None)


def test_a_soft_reboot_needs_no_kernel(
    fds: dict[tuple[str, str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(luo_uapi, "kexec_loaded", lambda: False)
    backend = FdStoreBackend()
    assert backend.write_handover(fds, entries_of(fds), "boot", lambda n: None) == 4096
