"""Recovery never turns a crash or a damaged journal into lost memory.

A start after Reboot is a new boot only on evidence; an fd the damaged journal cannot
explain is quarantined, never closed by recovery; sessions recorded before the damage
stay their owners'.
"""

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import (
    AccessDenied,
    NoSuchSession,
    NoSuchToken,
    WrongState,
)
from liveupdated.core.names import session_path
from liveupdated.core.records import SessionCreated
from liveupdated.privatebus import PrivateBus
from tests.conftest import Host, make_memfd
from tests.other_uid import OtherUid
from tests.rules_support import journal_frames

NOBODY = 65534


async def _vm(vmm: Client, name: str, content: bytes) -> int:
    session = await vmm.create_session(name)
    fd = make_memfd(1 << 16, content)
    await session.preserve_fd("ram", fd)
    await session.preserve_fd("state", make_memfd(4096, content[::-1]), ["ram"])
    return fd


async def _retrieve(vmm: Client, name: str, token: str = "ram") -> bytes:
    session = SessionClient(vmm, name, session_path(name))
    fd = await session.retrieve_fd(token)
    try:
        return os.pread(fd, 64, 0).rstrip(b"\0")
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def reboot_failures(address: str) -> AsyncIterator["asyncio.Queue[str]"]:
    """The reasons of the RebootFailed signals the daemon sends, as they come."""
    reasons: asyncio.Queue[str] = asyncio.Queue()
    bus = await MessageBus(bus_address=address).connect()

    def handle(msg: Message) -> None:
        if msg.member == "RebootFailed" and msg.interface == "org.liveupdate1.Manager":
            reasons.put_nowait(msg.body[0])

    bus.add_message_handler(handle)
    reply = await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=["type='signal',interface='org.liveupdate1.Manager',member='RebootFailed'"]))
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN
    try:
        yield reasons
    finally:
        bus.disconnect()


@pytest.mark.parametrize("then", ["cancel", "reboot again"])
async def test_a_restart_between_reboot_and_the_kexec_is_a_crash_in_frozen(
    host: Host, bus: PrivateBus, then: str
) -> None:
    """The reboot command ran but no new boot came (same boot id, no KexecSimulated):
    the handover is not taken, the state is frozen, and Cancel or Reboot works."""
    old = host.start_now("--reboot-action", "true", "--reboot-timeout", "0.2")
    async with await Client.connect(bus.address) as vmm:
        fd = await _vm(vmm, "vm", b"guest memory")
        await vmm.prepare()
        await vmm.freeze()
        async with reboot_failures(bus.address) as failures:
            await vmm.reboot()
            assert "no reboot followed" in await failures.get()
        assert old.stop() == 0  # the daemon stayed, frozen, until it was stopped
        host.start_now()
        assert await vmm.state() == "frozen"
        with pytest.raises(WrongState):
            await vmm.retrieve_session("vm")
        if then == "cancel":
            await vmm.cancel()
            assert await vmm.state() == "normal"
            assert await _retrieve(vmm, "vm") == b"guest memory"
        else:
            await vmm.reboot()
            assert host.daemons[-1].wait() == 0
            host.start_now()
            assert await vmm.state() == "updated"
            await vmm.retrieve_session("vm")
            assert await _retrieve(vmm, "vm") == b"guest memory"
            assert await _retrieve(vmm, "vm", "state") == b"yromem tseug"
    os.close(fd)


async def test_a_kill_9_right_after_reboots_reply_is_a_crash_in_frozen(
    host: Host, bus: PrivateBus
) -> None:
    """The reply is on the wire, the daemon dies before its exit (the simulated kexec):
    no evidence of a new boot, so nothing is taken for one."""
    old = host.start_now("--reboot-action", "sleep 600")
    async with await Client.connect(bus.address) as vmm:
        fd = await _vm(vmm, "vm", b"still running")
        await vmm.prepare()
        await vmm.freeze()
        await vmm.reboot()
        old.kill()
        host.start_now()
        assert await vmm.state() == "frozen"
        await vmm.cancel()
        assert await _retrieve(vmm, "vm") == b"still running"
    os.close(fd)


def _damage_session_records(journal: Path, *sessions: str) -> None:
    """Flip one bit in the payload of each frame that creates one of `sessions`."""
    data = bytearray(journal.read_bytes())
    damaged = set()
    for offset, length, records in journal_frames(journal):
        for r in records:
            if isinstance(r, SessionCreated) and r.session in sessions:
                data[offset + length // 2] ^= 0x10
                damaged.add(r.session)
    assert damaged == set(sessions)
    journal.write_bytes(bytes(data))


async def test_fds_the_damaged_journal_cannot_explain_are_quarantined_never_closed(
    host: Host, bus: PrivateBus
) -> None:
    daemon = host.start_now()
    async with await Client.connect(bus.address) as vmm, OtherUid(bus.address) as nobody:
        fds = [await _vm(vmm, name, name.encode()) for name in ("vm-a", "vm-b", "vm-c")]
        await nobody.call("create_session", name=f"{NOBODY}-vm")
        await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="ram",
                          data=b"tenant".hex(), size=4096, keep=True)
        daemon.stop()
        _damage_session_records(host.state / "journal", "vm-b", f"{NOBODY}-vm")
        host.start_now()
        # Sessions whose records survived are their owners' as before.
        assert await _retrieve(vmm, "vm-a") == b"vm-a"
        assert await _retrieve(vmm, "vm-c") == b"vm-c"
        assert sorted(s.name for s in await vmm.list_sessions()) == ["vm-a", "vm-c"]
        quarantined = {(q.session, q.token): q for q in await vmm.list_quarantined()}
        ids = {key: q.id for key, q in quarantined.items()}
        assert sorted(quarantined) == [
            (f"{NOBODY}-vm", "ram"), ("vm-b", "ram"), ("vm-b", "state")
        ]
        assert quarantined[("vm-b", "ram")].size == 1 << 16
        # Each stored under its id, never under a name a new session could take.
        assert sorted(host.store.store) == sorted(
            [f"{s}/{t}" for s in ("vm-a", "vm-c") for t in ("ram", "state")]
            + [f"@q/{qid}" for qid in ids.values()]
        )
        # The tenant sees what is named after it, and only that; only root takes it.
        assert await nobody.call("list_quarantined") == [
            [ids[(f"{NOBODY}-vm", "ram")], f"{NOBODY}-vm", "ram", 4096,
             "its session's records were lost"]
        ]
        with pytest.raises(AccessDenied):
            await nobody.call("drop_session", name="vm-a", reason="")
        # A quarantined fd does not hold its old session name: its owner starts anew.
        await vmm.create_session("vm-b")
        await vmm.drop_session("vm-b")
        # Nothing quarantined may be carried unnoticed into the next kernel.
        await vmm.prepare()
        with pytest.raises(WrongState, match="quarantined fds"):
            await vmm.freeze()
        salvaged = await vmm.retrieve_quarantined(ids[("vm-b", "ram")])
        assert os.pread(salvaged, 4, 0) == b"vm-b"
        os.close(salvaged)
        host.crash_now()  # quarantine is journaled: it survives a restart unchanged
        assert len(await vmm.list_quarantined()) == 3
        for qid in ids.values():
            await vmm.release_quarantined(qid)
        with pytest.raises(NoSuchToken):
            await vmm.release_quarantined(ids[("vm-b", "ram")])
        host.store.settle()  # the releases' FDSTOREREMOVE: no barrier before the reply
        assert sorted(host.store.store) == [
            f"{s}/{t}" for s in ("vm-a", "vm-c") for t in ("ram", "state")
        ]
        await vmm.freeze()
    for fd in fds:
        os.close(fd)


async def test_a_damaged_journal_header_keeps_every_session(
    host: Host, bus: PrivateBus
) -> None:
    daemon = host.start_now()
    async with await Client.connect(bus.address) as vmm:
        fds = [await _vm(vmm, f"vm-{i}", f"vm-{i}".encode()) for i in range(5)]
        daemon.stop()
        journal = host.state / "journal"
        data = bytearray(journal.read_bytes())
        data[3] ^= 0x01
        journal.write_bytes(bytes(data))
        host.start_now()
        assert await vmm.list_quarantined() == []
        for i in range(5):
            assert await _retrieve(vmm, f"vm-{i}") == f"vm-{i}".encode()
        with pytest.raises(NoSuchSession):
            await _retrieve(vmm, "vm-5")
    for fd in fds:
        os.close(fd)
