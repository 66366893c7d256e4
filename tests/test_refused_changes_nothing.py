"""A command the journal refuses (Error.Storage) changes nothing: not the state clients
see, not the fds the daemon holds, not the fd store; the same command succeeds once the
disk has room. The journal is refused mid-command: the decision was taken and applied,
then undone when its write failed (a full disk: a tmpfs of its own, filled)."""

import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from liveupdated.client import Client
from liveupdated.core.errors import Storage
from liveupdated.privatebus import PrivateBus
from tests.conftest import Host, fill_disk, make_memfd


async def _first_refused(change: Callable[[int], Awaitable[object]]) -> int:
    """Make changes until the journal refuses one; which attempt it was."""
    for attempt in range(400):
        try:
            await change(attempt)
        except Storage as exc:
            assert "ENOSPC" in str(exc)
            return attempt
    raise AssertionError("the journal was never refused")


@pytest.fixture
def full_host(bus: PrivateBus, small_disk: Path, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path, state_dir=small_disk / "state") as host:
        yield host


async def test_a_refused_create_session_leaves_no_ghost(
    full_host: Host, bus: PrivateBus, small_disk: Path
) -> None:
    full_host.start_now()
    async with await Client.connect(bus.address) as vmm:
        filler = fill_disk(small_disk)
        refused = await _first_refused(lambda i: vmm.create_session(f"vm-{i}"))
        name = f"vm-{refused}"
        assert name not in {s.name for s in await vmm.list_sessions()}
        filler.unlink()
        session = await vmm.create_session(name)  # not SessionExists: nothing was left
        assert session.name == name
        full_host.crash_now()
        assert name in {s.name for s in await vmm.list_sessions()}


async def test_a_refused_preserve_fd_holds_and_stores_nothing(
    full_host: Host, bus: PrivateBus, small_disk: Path
) -> None:
    daemon = full_host.start_now()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm")
        memfd = make_memfd(4096, b"guest")
        filler = fill_disk(small_disk)
        refused = await _first_refused(lambda i: session.preserve_fd(f"t{i}", memfd))
        token = f"t{refused}"
        assert token not in {f.token for f in await session.list_fds()}
        full_host.store.settle()  # a refusal's undo sends no barrier before the reply
        assert f"vm/{token}" not in full_host.store.store
        held = len(await session.list_fds())
        filler.unlink()
        await session.preserve_fd(token, memfd)  # not TokenExists
        assert len(await session.list_fds()) == held + 1
        # The daemon holds one fd per token, no more: the refused call's fd was closed.
        links = [os.readlink(f"/proc/{daemon.pid}/fd/{n}") for n in
                 os.listdir(f"/proc/{daemon.pid}/fd")]
        assert sum(link.startswith("/memfd:ram") for link in links) == held + 1
    os.close(memfd)


async def test_a_refused_unpreserve_fd_keeps_the_fd_held_and_stored(
    full_host: Host, bus: PrivateBus, small_disk: Path
) -> None:
    full_host.start_now()
    async with await Client.connect(bus.address) as vmm:
        sessions = [await vmm.create_session(f"vm{s}") for s in range(3)]
        for session in sessions:
            for n in range(120):
                fd = make_memfd(4096, f"{session.name} {n}".encode())
                await session.preserve_fd(f"t{n}", fd)
                os.close(fd)
        filler = fill_disk(small_disk)
        refused = await _first_refused(
            lambda i: sessions[i // 120].unpreserve_fd(f"t{i % 120}"))
        session, token = sessions[refused // 120], f"t{refused % 120}"
        assert token in {f.token for f in await session.list_fds()}
        full_host.store.settle()  # a refusal's undo sends no barrier before the reply
        assert f"{session.name}/{token}" in full_host.store.store  # stored again
        fd = await session.retrieve_fd(token)
        expected = f"{session.name} {refused % 120}".encode()
        assert os.pread(fd, 16, 0).rstrip(b"\0") == expected
        os.close(fd)
        filler.unlink()
        await session.unpreserve_fd(token)
        assert token not in {f.token for f in await session.list_fds()}
        # The journal agrees with what clients were told: a restart shows the same.
        full_host.crash_now()
        assert token not in {f.token for f in await session.list_fds()}


async def test_a_refused_prepare_leaves_normal_and_no_history(
    full_host: Host, bus: PrivateBus, small_disk: Path
) -> None:
    full_host.start_now()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm")
        fd = make_memfd(4096, b"guest")
        await session.preserve_fd("ram", fd)
        os.close(fd)
        filler = fill_disk(small_disk)
        # Fill the journal's last page first, then Prepare is the change refused.
        await _first_refused(lambda i: session.delay_freeze(i % 2 == 0))
        with pytest.raises(Storage):
            await vmm.prepare()
        assert await vmm.state() == "normal"
        assert await vmm.get_history() == []
        filler.unlink()
        await vmm.prepare()
        assert await vmm.state() == "prepared"
