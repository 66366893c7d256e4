"""Session.RetrieveFds, and fds restored ahead of RetrieveFd, over a real bus.

Every test runs real daemons on a private bus with the simulated backend; a reboot is
Prepare, Freeze, Reboot and the next daemon's start on the same state dir and fd store.
"""

import asyncio
import fcntl
import json
import os
from pathlib import Path

import pytest

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import (
    AccessDenied,
    Corrupted,
    InvalidArgument,
    NoSuchToken,
    Storage,
    WrongState,
)
from liveupdated.core.names import session_path
from liveupdated.privatebus import PrivateBus
from tests.conftest import Host, carried_data, fill_disk, make_memfd, memfds_held, open_fds
from tests.other_uid import OtherUid, digest

NOBODY = 65534


def _content(token: str, size: int) -> bytes:
    """The first half of the memfd: its own bytes; the rest is a hole."""
    return (token.encode() + b"/") * (size // 2 // (len(token) + 1))


async def _preserve(vmm: Client, name: str, sizes: dict[str, int]) -> dict[str, bytes]:
    """A session holding one memfd per token, each of its own size and bytes."""
    session = await vmm.create_session(name)
    contents = {}
    for token, size in sizes.items():
        contents[token] = _content(token, size)
        fd = make_memfd(size, contents[token], name=token)
        try:
            await session.preserve_fd(token, fd)
        finally:
            os.close(fd)
    return contents


async def _reboot(host: Host, admin: Client) -> None:
    await admin.prepare()
    await admin.freeze()
    await admin.reboot()
    assert host.daemons[-1].wait() == 0
    host.start_now()


def _whole(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


def _expected(contents: dict[str, bytes], token: str, size: int) -> bytes:
    return contents[token] + bytes(size - len(contents[token]))


SIZES = {"ram": 64 << 10, "state": 4096, "rom": 40 << 20, "empty": 0}


async def test_retrieve_fds_hands_back_each_fd_byte_exact_in_the_order_asked(
    host: Host, bus: PrivateBus, tmp_path: Path
) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        contents = await _preserve(vmm, "vm", SIZES)
        session = SessionClient(vmm, "vm", session_path("vm"))
        # Before the update: dups of the held fds.
        got = await session.retrieve_fds(["state", "ram"])
        assert [t for t, _ in got] == ["state", "ram"]
        for token, fd in got:
            assert _whole(fd) == _expected(contents, token, SIZES[token])
            os.close(fd)
        await _reboot(host, vmm)
        session = await vmm.retrieve_session("vm")
        order = ["rom", "empty", "state", "ram"]
        got = await session.retrieve_fds(order)
        assert [t for t, _ in got] == order
        for token, fd in got:
            assert os.fstat(fd).st_size == SIZES[token]
            assert _whole(fd) == _expected(contents, token, SIZES[token]), token
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            os.close(fd)
        # Asked again, one at a time or all at once: the same bytes.
        fd = await session.retrieve_fd("ram")
        assert _whole(fd) == _expected(contents, "ram", SIZES["ram"])
        os.close(fd)
        assert await session.retrieve_fds([]) == []
        # The restores are logged by session (at the latest when it finishes).
        await session.finish()
        logged = [json.loads(line[3:]) for line in
                  (tmp_path / "daemon.log").read_text().splitlines() if "fds_restored" in line]
        assert sorted(t for e in logged for t in e["tokens"]) == sorted(SIZES)
        assert {e["session"] for e in logged} == {"vm"}
        assert sum(e["bytes"] for e in logged) == sum(SIZES.values())


async def test_retrieve_fds_refuses_what_retrieve_fd_refuses_naming_the_token(
    host: Host, bus: PrivateBus
) -> None:
    daemon = host.start_now()
    async with await Client.connect(bus.address) as vmm, OtherUid(bus.address) as nobody:
        await _preserve(vmm, "vm", {"ram": 4096, "state": 4096})
        session = SessionClient(vmm, "vm", session_path("vm"))
        held = open_fds(daemon.pid)
        with pytest.raises(NoSuchToken, match="'nvram'"):
            await session.retrieve_fds(["ram", "nvram", "state"])
        with pytest.raises(InvalidArgument, match="'ram' twice"):
            await session.retrieve_fds(["ram", "state", "ram"])
        with pytest.raises(InvalidArgument, match="at most 16 tokens a call, not 17"):
            await session.retrieve_fds([f"t{i}" for i in range(17)])
        with pytest.raises(AccessDenied, match="uid 0"):
            await nobody.call("retrieve_fds", session="vm", tokens=["ram"])
        await vmm.prepare()
        with pytest.raises(WrongState, match="RetrieveFd"):
            await session.retrieve_fds(["ram"])
        assert open_fds(daemon.pid) == held  # no dup left behind
        await vmm.freeze()
        await vmm.reboot()
        assert host.daemons[-1].wait() == 0
        host.start_now()
        session = await vmm.retrieve_session("vm")
        with pytest.raises(NoSuchToken, match="'nvram'"):
            await session.retrieve_fds(["ram", "nvram"])
        await session.finish()
        with pytest.raises(WrongState, match="finished"):
            await session.retrieve_fds(["ram"])


async def test_a_tenant_retrieves_its_own_fds_together(host: Host, bus: PrivateBus) -> None:
    host.start_now()
    async with OtherUid(bus.address) as nobody:
        name = f"{NOBODY}-vm"
        await nobody.call("create_session", name=name)
        for token in ("ram", "state"):
            await nobody.call("preserve_fd", session=name, token=token,
                              data=token.encode().hex(), size=8192)
        got = await nobody.call("retrieve_fds", session=name, tokens=["state", "ram"])
        ram = make_memfd(8192, b"ram")
        state = make_memfd(8192, b"state")
        assert got == [["state", digest(state)], ["ram", digest(ram)]]
        os.close(ram)
        os.close(state)


def _damage(area: Path, name: str) -> None:
    """Flip one byte of the handover data of one fd, its size kept."""
    path, offset = carried_data(area, "vm", name)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


async def test_one_damaged_fd_fails_the_call_by_name_and_the_others_still_come_back(
    host: Host, bus: PrivateBus
) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        contents = await _preserve(vmm, "vm", {"ram": 8192, "state": 8192, "rom": 8192})
        await vmm.prepare()
        await vmm.freeze()
        await vmm.reboot()
        assert host.daemons[-1].wait() == 0
        _damage(host.state / "handover", "state")
        daemon = host.start_now()
        session = await vmm.retrieve_session("vm")
        with pytest.raises(Corrupted, match="vm/state"):
            await session.retrieve_fds(["ram", "state", "rom"])
        with pytest.raises(Corrupted, match="vm/state"):  # asked again: checked again
            await session.retrieve_fd("state")
        got = await session.retrieve_fds(["rom", "ram"])
        for token, fd in got:
            assert _whole(fd) == _expected(contents, token, 8192)
            os.close(fd)
        await vmm.finish()
        assert memfds_held(daemon.pid) == 0
        assert host.store.store == {}


async def test_fds_restored_ahead_and_never_asked_for_are_released_at_finish(
    host: Host, bus: PrivateBus
) -> None:
    """RetrieveSession starts restoring every fd; what nobody claims is closed by the
    Session.Finish or Finish that lets it go, never stored or journaled as restored."""
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        vms = {f"vm{i}": await _preserve(vmm, f"vm{i}", {f"ram{j}": 16384 for j in range(8)})
               for i in range(3)}
        await _reboot(host, vmm)
        daemon = host.daemons[-1]
        first = await vmm.retrieve_session("vm0")
        fd = await first.retrieve_fd("ram3")
        assert _whole(fd) == _expected(vms["vm0"], "ram3", 16384)
        os.close(fd)
        # The old boot's own fds stay in the store as spares until Finish (the handover
        # is their content's source); what was handed out is stored again beside them.
        assert "vm0/ram3" in host.store.store
        second = await vmm.retrieve_session("vm1")
        await second.finish()  # none of vm1's fds was asked for
        got = await first.retrieve_fds([f"ram{j}" for j in range(8)])
        for token, fd in got:
            assert _whole(fd) == _expected(vms["vm0"], token, 16384)
            os.close(fd)
        assert not any(name.startswith("vm1/") for name in host.store.store)
        # A restart now: the restored fds come back from the store, the others from the
        # handover, byte-exact either way.
        host.crash_now()
        third = await vmm.retrieve_session("vm2")
        fd = await third.retrieve_fd("ram7")
        assert _whole(fd) == _expected(vms["vm2"], "ram7", 16384)
        os.close(fd)
        await vmm.finish()
        assert memfds_held(host.daemons[-1].pid) == 0
        assert host.store.store == {}
        assert daemon.process is not None and daemon.process.poll() is not None


async def test_retrieve_fd_of_a_known_caller_answers_as_the_method(
    host: Host, bus: PrivateBus
) -> None:
    """Once the caller is known, RetrieveFd is answered outside dbus-fast's dispatch:
    the same fds, the same errors, and calls pipelined on one connection all answered."""
    host.start_now()
    async with await Client.connect(bus.address) as vmm, OtherUid(bus.address) as nobody:
        contents = await _preserve(vmm, "vm", {f"ram{j}": 8192 for j in range(20)})
        await nobody.call("state")  # known to the daemon from now on
        await _reboot(host, vmm)
        session = await vmm.retrieve_session("vm")
        fds = await asyncio.gather(*(session.retrieve_fd(f"ram{j}") for j in range(20)),
                                   session.retrieve_fd("ram7"))
        for j, fd in enumerate(fds):
            assert _whole(fd) == _expected(contents, f"ram{j % 20 if j < 20 else 7}", 8192)
            os.close(fd)
        with pytest.raises(NoSuchToken, match="'nvram'"):
            await session.retrieve_fd("nvram")
        with pytest.raises(InvalidArgument, match="token"):
            await session.retrieve_fd("no/slash")
        await nobody.call("state")
        with pytest.raises(AccessDenied, match="uid 0"):
            await nobody.call("retrieve_fd", session="vm", token="ram0")
        await session.finish()
        with pytest.raises(WrongState, match="finished"):
            await session.retrieve_fd("ram0")


async def test_a_disk_that_fills_after_the_reboot_still_gets_every_fd_back(
    bus: PrivateBus, small_disk: Path, tmp_path: Path
) -> None:
    """The journal refuses the restores' records: the daemon is degraded, and every fd
    is handed back byte-exact all the same, one at a time or together."""
    host = Host(bus, tmp_path, state_dir=small_disk / "state")
    try:
        host.start_now()
        async with await Client.connect(bus.address) as vmm:
            sizes = {f"ram{j}": 4096 for j in range(64)}
            contents = await _preserve(vmm, "vm", sizes)
            await _reboot(host, vmm)
            filler = fill_disk(small_disk)
            session = await vmm.retrieve_session("vm")
            for j in range(32):
                fd = await session.retrieve_fd(f"ram{j}")
                assert _whole(fd) == _expected(contents, f"ram{j}", 4096)
                os.close(fd)
            for k in range(32, 64, 16):
                got = await session.retrieve_fds([f"ram{j}" for j in range(k, k + 16)])
                for token, fd in got:
                    assert _whole(fd) == _expected(contents, token, 4096)
                    os.close(fd)
            with pytest.raises(Storage, match="ENOSPC"):
                await session.finish()  # degraded: changes are refused
            filler.unlink()
            await session.finish()  # back by itself
            await vmm.finish()
            assert host.store.store == {}
    finally:
        host.close()
