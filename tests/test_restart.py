"""A restart or crash of the daemon loses nothing: journal plus fd store, in every state.

`sandbox.Notifications` plays systemd's fd store here; the nspawn suite proves the same
with real systemd.
"""

import asyncio
import os
from pathlib import Path

import pytest
from dbus_fast import Message

from liveupdated import __version__
from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import DependencyMissing, NoSuchToken
from liveupdated.core.records import DaemonStarted
from liveupdated.journal import decode
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import Notifications
from liveupdated.systemd import boot_id
from tests.conftest import Host, make_memfd, open_fds


async def _preserve_two(vmm: Client) -> dict[str, int]:
    session = await vmm.create_session("vm")
    fds = {"ram": make_memfd(1 << 20, b"ram content"), "rom": make_memfd(4096, b"rom")}
    for token, fd in fds.items():
        await session.preserve_fd(token, fd, ["ram"] if token == "rom" else [])
    return fds


@pytest.mark.parametrize("phase", ["normal", "prepared", "frozen"])
async def test_kill_9_loses_nothing(host: Host, bus: PrivateBus, phase: str) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        fds = await _preserve_two(vmm)
        for step in {"normal": [], "prepared": ["prepare"], "frozen": ["prepare", "freeze"]}[
            phase
        ]:
            await getattr(vmm, step)()
        assert sorted(host.store.store) == ["vm/ram", "vm/rom"]
        daemon = host.crash_now()
        assert await vmm.state() == phase
        assert [s.name for s in await vmm.list_sessions()] == ["vm"]
        session = SessionClient(vmm, "vm", "/org/liveupdate1/session/vm")
        assert [(f.token, f.kind, f.requires) for f in await session.list_fds()] == [
            ("ram", "memfd", []), ("rom", "memfd", ["ram"])
        ]
        if phase == "normal":
            back = await session.retrieve_fd("ram")
            assert os.fstat(back).st_ino == os.fstat(fds["ram"]).st_ino
            os.close(back)
        else:
            if phase == "prepared":
                await vmm.freeze()
            await vmm.reboot()
            assert daemon.wait() == 0
    for fd in fds.values():
        os.close(fd)
    if phase != "normal":
        host.start_now()
        async with await Client.connect(bus.address) as vmm:
            session = await vmm.retrieve_session("vm")
            back = await session.retrieve_fd("ram")
            assert os.pread(back, 11, 0) == b"ram content"
            os.close(back)


async def test_one_memfd_under_two_tokens_survives_a_crash(host: Host, bus: PrivateBus) -> None:
    """systemd keeps one fd per open file description: the second token must not vanish."""
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm")
        fd = make_memfd(4096, b"shared")
        await session.preserve_fd("ram", fd)
        await session.preserve_fd("alias", fd)
        assert host.store.wait_for(lambda n: sorted(n.store) == ["vm/alias", "vm/ram"], 10)
        host.crash_now()
        assert [f.kind for f in await session.list_fds()] == ["memfd", "memfd"]
        for token in ("ram", "alias"):
            back = await session.retrieve_fd(token)
            assert os.fstat(back).st_ino == os.fstat(fd).st_ino
            assert os.pread(back, 6, 0) == b"shared"
            os.close(back)
    os.close(fd)


async def test_a_full_notify_queue_delays_replies_not_the_daemon(
    host: Host, bus: PrivateBus
) -> None:
    """While the service manager reads nothing, PreserveFd waits for its fd to be stored;
    other calls are answered meanwhile, and every fd reaches the store in the end."""
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm")
        fds = [make_memfd(4096, bytes([i])) for i in range(40)]
        host.store.pause()
        calls = [asyncio.ensure_future(session.preserve_fd(f"ram{i}", fd))
                 for i, fd in enumerate(fds)]
        queue = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
        try:
            done, pending = await asyncio.wait(calls, timeout=1.0)
            assert pending and len(done) <= queue + 1  # answered: fds in the manager's queue
            assert [s.fd_count for s in await vmm.list_sessions()] == [40]
        finally:
            host.store.resume()
        await asyncio.gather(*calls)
        assert len(host.store.store) == 40
    for fd in fds:
        os.close(fd)


async def test_restored_fds_survive_a_crash_after_the_reboot(host: Host, bus: PrivateBus) -> None:
    old = host.start_now()
    async with await Client.connect(bus.address) as vmm:
        fds = await _preserve_two(vmm)
        await vmm.prepare()
        await vmm.freeze()
        await vmm.reboot()
    assert old.wait() == 0
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.retrieve_session("vm")
        first = await session.retrieve_fd("ram")
        os.pwrite(first, b"written after boot", 0)
        host.crash_now()
        session = await vmm.retrieve_session("vm")
        again = await session.retrieve_fd("ram")
        assert os.fstat(again).st_ino == os.fstat(first).st_ino
        assert os.pread(again, 18, 0) == b"written after boot"
        await vmm.finish()
        assert host.store.store == {}
    for fd in [first, again, *fds.values()]:
        os.close(fd)


async def test_without_the_fd_store_lost_fds_are_reported_never_invented(
    host: Host, bus: PrivateBus
) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        fds = await _preserve_two(vmm)
        host.daemons[-1].kill()
        empty = Notifications()
        try:
            host.start_now(store=empty)
            session = SessionClient(vmm, "vm", "/org/liveupdate1/session/vm")
            kinds = {f.token: f.kind for f in await session.list_fds()}
            assert kinds == {"ram": "memfd (lost)", "rom": "memfd (lost)"}
            with pytest.raises(NoSuchToken, match="lost"):
                await session.retrieve_fd("ram")
            await vmm.prepare()
            with pytest.raises(DependencyMissing, match=r"vm/ram \(its fd was lost"):
                await vmm.freeze()
            assert await vmm.state() == "prepared"
        finally:
            host.daemons[-1].kill()
            empty.close()
    for fd in fds.values():
        os.close(fd)


async def test_fds_the_journal_does_not_know_are_quarantined_not_closed(
    host: Host, bus: PrivateBus
) -> None:
    """A journal cut at a frame boundary looks intact: an fd it does not know may be a
    VM's memory whose record was lost, so recovery keeps it for the admin."""
    stray = make_memfd(4096, b"stray")
    host.store.store["ghost/fd"] = os.dup(stray)
    daemon = host.start_now()
    assert sum(
        os.readlink(f"/proc/{daemon.pid}/fd/{n}").startswith("/memfd:ram")
        for n in os.listdir(f"/proc/{daemon.pid}/fd")
    ) == 1
    async with await Client.connect(bus.address) as vmm:
        assert await vmm.list_sessions() == []
        [ghost] = await vmm.list_quarantined()
        assert (ghost.session, ghost.token, ghost.size) == ("ghost", "fd", 4096)
        # Kept under an id of its own, in the store too: never under a live name.
        assert ghost.id == "q1"
        assert "ghost/fd" not in host.store.store and "@q/q1" in host.store.store
        back = await vmm.retrieve_quarantined(ghost.id)
        assert os.pread(back, 5, 0) == b"stray"
        os.close(back)
        await vmm.release_quarantined(ghost.id)
        assert await vmm.list_quarantined() == []
        host.store.settle()  # the release's FDSTOREREMOVE: no barrier before the reply
        assert "@q/q1" not in host.store.store
    os.close(stray)


async def test_released_fds_leave_the_fd_store(host: Host, bus: PrivateBus) -> None:
    daemon = host.start_now()
    async with await Client.connect(bus.address) as vmm:
        fds = await _preserve_two(vmm)
        baseline = open_fds(daemon.pid)
        session = SessionClient(vmm, "vm", "/org/liveupdate1/session/vm")
        await session.unpreserve_fd("rom")
        assert host.store.wait_for(lambda n: "vm/rom" not in n.store, 10)
        assert open_fds(daemon.pid) == baseline - 1
        await session.close()
        assert host.store.wait_for(lambda n: n.store == {}, 10)
    for fd in fds.values():
        os.close(fd)


async def test_a_torn_journal_tail_is_cut_and_logged(host: Host, bus: PrivateBus,
                                                     tmp_path: Path) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        fds = await _preserve_two(vmm)
        host.daemons[-1].kill()
        journal = tmp_path / "state" / "journal"
        with journal.open("ab") as f:
            f.write(b"\x40\x00\x00\x00\x01\x02")  # a frame header cut short by a crash
        host.start_now()
        assert [s.fd_count for s in await vmm.list_sessions()] == [2]
    log = (tmp_path / "daemon.log").read_text()
    assert '"event": "journal_tail_cut"' in log and "torn frame" in log
    for fd in fds.values():
        os.close(fd)


async def test_sessions_of_departed_clients_are_dropped_at_restart(
    host: Host, bus: PrivateBus
) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as stays:
        await stays.create_session("stays")
        leaver = await Client.connect(bus.address)
        await leaver.create_session("leaves")
        host.daemons[-1].kill()
        gone = asyncio.Event()
        name = leaver.bus.unique_name

        def on_owner_change(msg: Message) -> bool:
            if msg.member == "NameOwnerChanged" and msg.body[0] == name and not msg.body[2]:
                gone.set()
            return False

        stays.bus.add_message_handler(on_owner_change)
        await stays.add_match(f"type='signal',member='NameOwnerChanged',arg0='{name}'")
        leaver.close()
        await asyncio.wait_for(gone.wait(), 10)
        host.start_now()
        assert [s.name for s in await stays.list_sessions()] == ["stays"]


async def test_every_start_journals_the_release_and_the_boot(host: Host, bus: PrivateBus) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        await vmm.create_session("vm")
        host.crash_now()
        assert [s.name for s in await vmm.list_sessions()] == ["vm"]
    records, damages, _ = decode((host.state / "journal").read_bytes())
    assert damages == []
    started = [r for r in records if isinstance(r, DaemonStarted)]
    assert [(r.version, r.boot_id) for r in started] == [(__version__, boot_id())] * 2
    assert 0 < started[0].at_usec <= started[1].at_usec
