"""Finish over a real bus: Session.Finish releases that session's unretrieved fds;
Manager.Finish releases everything not retrieved, drops finished sessions, compacts the
journal and returns to NORMAL. Nothing preserved outlives Finish, on disk or in memory.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated import __version__
from liveupdated.core.errors import WrongState
from liveupdated.core.records import DaemonStarted
from liveupdated.journal import Journal
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd
from tests.other_uid import OtherUid, content_digest, digest
from tests.rules_support import NOBODY, Host, session_records

MIB = 1 << 20


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


def dense_memfd(size: int, seed: int) -> int:
    """A memfd whose every byte is data (no holes), so its handover copy takes space."""
    return make_memfd(size, bytes((seed + i) % 251 for i in range(size)), name=f"m{seed}")


def allocated_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


async def test_session_finish_releases_that_sessions_unretrieved_fds(host: Host) -> None:
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        vm = await root.create_session("vm-a")
        for seed, token in enumerate(["ram", "disk", "nvram"]):
            fd = dense_memfd(MIB // 2, seed)
            await vm.preserve_fd(token, fd)
            if token == "ram":
                want_ram = digest(fd)
            os.close(fd)
        await nobody.call("create_session", name="65534-vm-b")
        await nobody.call("preserve_fd", session="65534-vm-b", token="ram", data=b"b".hex())
        await root.prepare()
        await root.freeze()
        await host.reboot(root)

    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        vm = await root.retrieve_session("vm-a")
        ram = await vm.retrieve_fd("ram")
        held = await host.open_fds(root)
        area = allocated_bytes(host.handover_dir)
        await vm.finish()

        assert [f.token for f in await vm.list_fds()] == ["ram"]
        for token in ("disk", "nvram", "ram"):
            with pytest.raises(WrongState, match="finished"):
                await vm.retrieve_fd(token)
        assert {s.name: s.state for s in await root.list_sessions()} == {
            "vm-a": "finished", "65534-vm-b": "incoming"
        }
        # Released for real: the handover data of disk and nvram is gone, nothing leaked.
        freed = area - allocated_bytes(host.handover_dir)
        assert freed >= MIB, (
            f"Session.Finish released vm-a/disk and vm-a/nvram ({MIB} bytes of data) but "
            f"the handover area only shrank by {freed} bytes"
        )
        assert await host.open_fds(root) <= held
        assert digest(ram) == want_ram, "Session.Finish changed an fd its VMM had retrieved"
        os.close(ram)
        # Every other session is untouched.
        await nobody.call("retrieve_session", name="65534-vm-b")
        assert await nobody.call("retrieve_fd", session="65534-vm-b", token="ram") == (
            content_digest(b"b", 1)
        )
        await root.finish()


async def _three_sessions_through_the_reboot(host: Host) -> None:
    """vm-a (root: ram, disk requires ram), 65534-vm-b (nobody: ram, fw), vm-c (root: ram)."""
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        a = await root.create_session("vm-a")
        for seed, token in enumerate(["ram", "disk"]):
            fd = dense_memfd(32 * 1024, seed)
            await a.preserve_fd(token, fd, ["ram"] if token == "disk" else [])
            os.close(fd)
        await nobody.call("create_session", name="65534-vm-b")
        await nobody.call("preserve_fd", session="65534-vm-b", token="ram", data=b"bee".hex())
        await nobody.call("preserve_fd", session="65534-vm-b", token="fw", data=b"fw".hex())
        c = await root.create_session("vm-c")
        fd = dense_memfd(32 * 1024, 9)
        await c.preserve_fd("ram", fd)
        os.close(fd)
        await root.prepare()
        await root.freeze()
        await host.reboot(root)


async def test_finish_leaves_nothing_behind(host: Host) -> None:
    await host.start()
    await _three_sessions_through_the_reboot(host)
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        baseline = await host.open_fds(root)
        assert host.handover_files() != []
        a = await root.retrieve_session("vm-a")
        kept = await a.retrieve_fd("ram")  # a VMM keeps its memory after Finish
        want = digest(kept)
        await nobody.call("retrieve_session", name="65534-vm-b")
        await nobody.call("retrieve_fd", session="65534-vm-b", token="ram")
        await nobody.call("finish_session", session="65534-vm-b")
        before_finish = host.journal_records()

        await root.finish()

        assert await root.state() == "normal"
        assert await root.list_sessions() == []
        assert await nobody.call("list_sessions") == []
        assert host.handover_files() == []
        assert await host.open_fds(root) == baseline
        assert host.notifications.wait_for(lambda n: not n.store, timeout=10), (
            f"the fd store still holds {host.stored_fd_names()}"
        )
        assert digest(kept) == want
        os.close(kept)
        with pytest.raises(WrongState):
            await root.retrieve_session("vm-a")
        await host.stop()

    journal, records, damage = Journal.open(host.journal_path)
    journal.close()
    assert not damage
    assert session_records(records) == [], "Finish left session records in the journal"
    assert len(records) < len(before_finish), "Finish did not compact the journal"
    # At most the cycle's history, beside the latest start of the daemon.
    assert len([r for r in records if not isinstance(r, DaemonStarted)]) <= 1
    assert [r.version for r in records if isinstance(r, DaemonStarted)] == [__version__]
    await _next_start_is_a_clean_normal_host(host)


async def _next_start_is_a_clean_normal_host(host: Host) -> None:
    await host.start(*host.args)
    async with await host.connect() as root:
        assert await root.state() == "normal"
        assert await root.list_sessions() == []
        again = await root.create_session("vm-a")
        fd = make_memfd(4096, b"next update")
        await again.preserve_fd("ram", fd)
        os.close(fd)
        assert host.handover_files() == []
