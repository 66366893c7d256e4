"""Client lifetime over a real bus: a session lives as long as its owning connection
until Prepare, and on its own from Prepare on; a daemon restart keeps the sessions
whose owner is still connected and drops the others.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated.core.records import FdReleased, SessionDropped
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd
from tests.other_uid import OtherUid, content_digest
from tests.rules_support import (
    NOBODY,
    Host,
    eventually,
    gone_from_bus,
    session_names,
)

RAM = b"guest ram of a VMM that will go away"


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


async def test_session_is_dropped_with_its_fds_when_its_owner_leaves_before_prepare(
    host: Host,
) -> None:
    await host.start()
    async with await host.connect() as root, await host.connect() as short_lived:
        baseline = await host.open_fds(root)
        stays = await root.create_session("vm-stays")
        fd = make_memfd(4096, b"stays")
        await stays.preserve_fd("ram", fd)
        os.close(fd)
        async with OtherUid(host.address, NOBODY) as nobody:
            await nobody.call("create_session", name="65534-vm-nobody")
            await nobody.call("preserve_fd", session="65534-vm-nobody", token="ram", data=RAM.hex())
            await nobody.call("preserve_fd", session="65534-vm-nobody", token="disk",
                              data=b"d".hex(), requires=["ram"])
            await nobody.call("create_session", name="65534-vm-nobody-2")
            other = await short_lived.create_session("vm-root-gone")
            fd = make_memfd(4096, b"gone")
            await other.preserve_fd("ram", fd)
            os.close(fd)
            assert await host.open_fds(root) == baseline + 4
            assert await nobody.leave() == 0
        short_lived.close()

        async def only_stays() -> bool:
            return await session_names(root) == ["vm-stays"]

        await eventually(only_stays, "the sessions of departed owners to be dropped")
        assert host.notifications.wait_for(
            lambda n: set(n.store) == {"vm-stays/ram"}, timeout=10
        ), f"fd store still holds {host.stored_fd_names()}"
        assert await host.open_fds(root) == baseline + 1

        departed = {"65534-vm-nobody", "65534-vm-nobody-2", "vm-root-gone"}

        async def drops_durable() -> bool:  # by the flush after a drop: no call awaits it
            return departed <= {r.session for r in host.journal_records()
                                if isinstance(r, SessionDropped)}

        await eventually(drops_durable, "the drops to reach the journal")
        records = host.journal_records()
        dropped = {r.session for r in records if isinstance(r, SessionDropped)}
        released = {(r.session, r.token) for r in records if isinstance(r, FdReleased)}
        assert dropped == departed
        assert released == {("65534-vm-nobody", "ram"), ("65534-vm-nobody", "disk"),
                            ("vm-root-gone", "ram")}
        assert [f.token for f in await stays.list_fds()] == ["ram"]
        got = await stays.retrieve_fd("ram")
        assert os.pread(got, 5, 0) == b"stays"
        os.close(got)
        # The name is free again, for anyone.
        again = await root.create_session("65534-vm-nobody")
        fd = make_memfd(10, b"again")
        await again.preserve_fd("ram", fd)
        os.close(fd)
        assert [f.token for f in await again.list_fds()] == ["ram"]


async def test_owners_that_left_before_prepare_are_dropped_even_if_prepare_follows_at_once(
    host: Host,
) -> None:
    """The bus saw every owner leave before Prepare was sent: none of them is carried."""
    await host.start()
    async with await host.connect() as root, contextlib.AsyncExitStack() as stack:
        vmms = [await stack.enter_async_context(await host.connect()) for _ in range(6)]
        for number, vmm in enumerate(vmms):
            session = await vmm.create_session(f"vm-{number}")
            fd = make_memfd(4096, b"crashed vmm")
            await session.preserve_fd("ram", fd)
            os.close(fd)
        names = [vmm.bus.unique_name for vmm in vmms]
        for vmm in vmms:
            vmm.close()
        for name in names:
            assert name is not None
            await gone_from_bus(root, name)
        await root.prepare()
        carried = await session_names(root)
        assert carried == [], f"sessions of VMMs gone before Prepare were kept: {carried}"


@pytest.mark.parametrize("leaves_in", ["prepared", "frozen"])
async def test_session_outlives_its_client_from_prepare_on(host: Host, leaves_in: str) -> None:
    await host.start()
    async with await host.connect() as root:
        async with OtherUid(host.address, NOBODY) as nobody:
            await nobody.call("create_session", name="65534-vm")
            await nobody.call("preserve_fd", session="65534-vm", token="ram", data=RAM.hex(),
                              size=65536)
            await root.prepare()
            if leaves_in == "frozen":
                await root.freeze()
            name = nobody.unique_name
            await nobody.leave()
        await gone_from_bus(root, name)
        assert [(s.name, s.state, s.fd_count) for s in await root.list_sessions()] == [
            ("65534-vm", leaves_in, 1)
        ]
        if leaves_in == "prepared":
            await root.freeze()
        await host.reboot(root)

    async with OtherUid(host.address, NOBODY) as nobody:
        await nobody.call("retrieve_session", name="65534-vm")
        assert await nobody.call("retrieve_fd", session="65534-vm", token="ram") == content_digest(
            RAM, 65536
        )


@pytest.mark.parametrize("crash", [False, True], ids=["stop", "crash"])
async def test_restart_keeps_pre_prepare_sessions_whose_owner_is_still_connected(
    host: Host, crash: bool
) -> None:
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        await nobody.call("create_session", name="65534-vm-alive")
        await nobody.call("preserve_fd", session="65534-vm-alive", token="ram", data=RAM.hex())
        async with await host.connect() as departing:
            session = await departing.create_session("vm-departed")
            fd = make_memfd(4096, b"departed")
            await session.preserve_fd("ram", fd)
            os.close(fd)
            departed_name = departing.bus.unique_name
            assert departed_name is not None
            await host.stop(crash=crash)
        await gone_from_bus(root, departed_name)
        await host.start(*host.args)

        assert await session_names(root) == ["65534-vm-alive"]
        assert await nobody.call("retrieve_fd", session="65534-vm-alive", token="ram") == (
            content_digest(RAM, len(RAM))
        )
        assert host.notifications.wait_for(
            lambda n: set(n.store) == {"65534-vm-alive/ram"}, timeout=10
        ), f"fd store holds {host.stored_fd_names()}"
        holding = await host.open_fds(root)

        # The restarted daemon still follows the surviving owner.
        await nobody.leave()

        async def dropped() -> bool:
            return await session_names(root) == []

        await eventually(dropped, "65534-vm-alive to be dropped when its owner leaves")
        assert await host.open_fds(root) == holding - 1
        assert host.notifications.wait_for(lambda n: not n.store, timeout=10)


async def test_restart_in_prepared_keeps_sessions_whose_owner_left(host: Host) -> None:
    await host.start()
    async with await host.connect() as root:
        async with OtherUid(host.address, NOBODY) as nobody:
            await nobody.call("create_session", name="65534-vm")
            await nobody.call("preserve_fd", session="65534-vm", token="ram", data=RAM.hex())
            await root.prepare()
            await host.stop()
            name = nobody.unique_name
        await gone_from_bus(root, name)
        await host.start(*host.args)
        assert [(s.name, s.state) for s in await root.list_sessions()] == [("65534-vm", "prepared")]
        await root.freeze()
        await host.reboot(root)
    async with OtherUid(host.address, NOBODY) as nobody:
        assert await nobody.call("retrieve_fd", session="65534-vm", token="ram") == content_digest(
            RAM, len(RAM)
        )
