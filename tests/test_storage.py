"""A disk that refuses writes makes the daemon degraded, never makes it exit.

The state dir lives on a small tmpfs that a filler file makes full: every change is
then refused with Error.Storage naming the errno, while RetrieveFd, ListSessions and
Cancel are still served and every held fd stays held; with room again the daemon comes
back by itself and what it answered is durable.
"""

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import Storage
from liveupdated.core.names import session_path
from liveupdated.privatebus import PrivateBus
from tests.conftest import Host, fill_disk, make_memfd


async def _until_the_journal_is_refused(change: Callable[[int], Awaitable[object]]) -> None:
    """Repeat a change until the journal's own write fails: the last page of the journal
    file may still have room for a few records when the disk is already full."""
    for attempt in range(200):
        try:
            await change(attempt)
        except Storage as exc:
            if "journal" in str(exc):
                assert "ENOSPC" in str(exc)
                return
    raise AssertionError("the journal was never refused")


async def _retrieve(vmm: Client, name: str) -> bytes:
    fd = await SessionClient(vmm, name, session_path(name)).retrieve_fd("ram")
    try:
        return os.pread(fd, 16, 0).rstrip(b"\0")
    finally:
        os.close(fd)


async def test_a_full_disk_refuses_changes_serves_the_rest_and_recovers(
    bus: PrivateBus, small_disk: Path, tmp_path: Path
) -> None:
    host = Host(bus, tmp_path, state_dir=small_disk / "state")
    daemon = host.start_now()
    fds = []
    try:
        async with await Client.connect(bus.address) as vmm:
            session = await vmm.create_session("vm-a")
            fds.append(make_memfd(4096, b"before"))
            await session.preserve_fd("ram", fds[-1])
            filler = fill_disk(small_disk)
            fds.append(make_memfd(4096, b"during"))
            await _until_the_journal_is_refused(
                lambda i: session.preserve_fd(f"more{i}", fds[-1])
            )
            for change in (vmm.create_session("vm-b"), vmm.prepare(), session.close()):
                with pytest.raises(Storage, match="ENOSPC"):
                    await change
            assert await _retrieve(vmm, "vm-a") == b"before"
            assert [s.name for s in await vmm.list_sessions()] == ["vm-a"]
            assert daemon.process is not None and daemon.process.poll() is None
            filler.unlink()
            session_b = await vmm.create_session("vm-b")  # back by itself
            fds.append(make_memfd(4096, b"after"))
            await session_b.preserve_fd("ram", fds[-1])
            host.crash_now()
            assert await _retrieve(vmm, "vm-a") == b"before"
            assert await _retrieve(vmm, "vm-b") == b"after"
    finally:
        host.close()
        for fd in fds:
            os.close(fd)


async def test_cancel_is_served_on_a_full_disk(
    bus: PrivateBus, small_disk: Path, tmp_path: Path
) -> None:
    """The operator can always back out of an update; a restart before the disk has
    room again comes back frozen, never with anything lost."""
    host = Host(bus, tmp_path, state_dir=small_disk / "state")
    host.start_now()
    fd = make_memfd(4096, b"guest")
    try:
        async with await Client.connect(bus.address) as vmm:
            session = await vmm.create_session("vm")
            await session.preserve_fd("ram", fd)
            await vmm.prepare()
            await vmm.freeze()
            filler = fill_disk(small_disk)
            await _until_the_journal_is_refused(lambda _: vmm.reboot())
            await vmm.cancel()
            assert await vmm.state() == "normal"
            assert await _retrieve(vmm, "vm") == b"guest"
            host.crash_now()
            assert await vmm.state() == "frozen"  # the Cancel could not be recorded
            filler.unlink()
            await vmm.cancel()
            assert await _retrieve(vmm, "vm") == b"guest"
    finally:
        host.close()
        os.close(fd)


async def test_a_vmm_that_only_calls_preserve_fd_sees_the_daemon_recover(
    bus: PrivateBus, small_disk: Path, tmp_path: Path
) -> None:
    """PreserveFd from a known caller takes a fast path; degraded, it must still be the
    call that brings the daemon back once the disk has room."""
    host = Host(bus, tmp_path, state_dir=small_disk / "state")
    host.start_now()
    fd = make_memfd(4096, b"x")
    try:
        async with await Client.connect(bus.address) as vmm:
            session = await vmm.create_session("vm")
            await session.preserve_fd("first", fd)  # the caller is known from here on
            filler = fill_disk(small_disk)
            await _until_the_journal_is_refused(lambda i: session.preserve_fd(f"t{i}", fd))
            with pytest.raises(Storage):
                await session.preserve_fd("refused", fd)
            filler.unlink()
            await session.preserve_fd("after", fd)
            assert "after" in [f.token for f in await session.list_fds()]
    finally:
        host.close()
        os.close(fd)
