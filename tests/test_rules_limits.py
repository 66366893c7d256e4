"""Limits over a real bus: defaults within the 6.19 kernel's (744 sessions, 128 fds per
session), a per-uid session limit and a total preserved-bytes limit, all configurable;
QuotaExceeded names the limit, and a refused call changes nothing.
"""

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated.client import SessionClient
from liveupdated.config import parse_args
from liveupdated.core.errors import QuotaExceeded
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd
from tests.other_uid import OtherUid
from tests.rules_support import NOBODY, OTHER_UID, Host, session_names

KERNEL_MAX_SESSIONS = 744  # Linux 6.19 LUO
KERNEL_MAX_FDS_PER_SESSION = 128


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


async def preserve(session: SessionClient, token: str, size: int = 4096) -> None:
    fd = make_memfd(size, token.encode()[:size])
    try:
        await session.preserve_fd(token, fd)
    finally:
        os.close(fd)


def test_default_limits_do_not_exceed_the_kernels() -> None:
    limits = parse_args([]).limits
    assert 0 < limits.max_sessions <= KERNEL_MAX_SESSIONS
    assert 0 < limits.max_fds_per_session <= KERNEL_MAX_FDS_PER_SESSION
    assert 0 < limits.max_sessions_per_uid <= limits.max_sessions
    assert limits.max_preserved_bytes > 0


async def test_default_fds_per_session_limit_holds_over_the_bus(host: Host) -> None:
    await host.start()
    async with await host.connect() as root:
        vm = await root.create_session("vm")
        limit = parse_args([]).limits.max_fds_per_session
        fd = make_memfd(0, b"")
        try:
            await asyncio.gather(*(vm.preserve_fd(f"t{i}", fd) for i in range(limit)))
            fds = await host.open_fds(root)
            with pytest.raises(QuotaExceeded, match=f"maximum of {limit} fds"):
                await vm.preserve_fd("one-too-many", fd)
        finally:
            os.close(fd)
        assert len(await vm.list_fds()) == limit
        assert await host.open_fds(root) == fds


async def test_default_session_limit_holds_over_the_bus(host: Host) -> None:
    await host.start()
    async with await host.connect() as root:
        limit = parse_args([]).limits.max_sessions
        for start in range(0, limit, 64):
            await asyncio.gather(
                *(root.create_session(f"vm-{i}") for i in range(start, min(limit, start + 64)))
            )
        with pytest.raises(QuotaExceeded, match=f"maximum of {limit} sessions"):
            await root.create_session("one-too-many")
        assert len(await root.list_sessions()) == limit


async def test_max_sessions_is_configurable(host: Host) -> None:
    await host.start("--max-sessions", "3")
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        first = await root.create_session("vm-1")
        await root.create_session("vm-2")
        await nobody.call("create_session", name="65534-vm-3")
        with pytest.raises(QuotaExceeded, match="maximum of 3 sessions"):
            await root.create_session("vm-4")
        with pytest.raises(QuotaExceeded, match="3"):
            await nobody.call("create_session", name="65534-vm-5")
        assert await session_names(root) == ["65534-vm-3", "vm-1", "vm-2"]
        await first.close()
        await nobody.call("create_session", name="65534-vm-5")
        assert await session_names(root) == ["65534-vm-3", "65534-vm-5", "vm-2"]


async def test_max_fds_per_session_is_configurable(host: Host) -> None:
    await host.start("--max-fds-per-session", "2")
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        vm = await root.create_session("vm")
        await preserve(vm, "a")
        await preserve(vm, "b")
        fds = await host.open_fds(root)
        with pytest.raises(QuotaExceeded, match="maximum of 2 fds"):
            await preserve(vm, "c")
        assert await host.open_fds(root) == fds
        assert [f.token for f in await vm.list_fds()] == ["a", "b"]
        await nobody.call("create_session", name="65534-vm-nobody")
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="a", data="00")
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="b", data="00")
        with pytest.raises(QuotaExceeded, match="2"):
            await nobody.call("preserve_fd", session="65534-vm-nobody", token="c", data="00")
        await vm.unpreserve_fd("b")
        await preserve(vm, "c")
        assert [f.token for f in await vm.list_fds()] == ["a", "c"]


async def test_max_sessions_per_uid_is_configurable(host: Host) -> None:
    await host.start("--max-sessions-per-uid", "2")
    async with (
        await host.connect() as root,
        OtherUid(host.address, NOBODY) as nobody,
        OtherUid(host.address, OTHER_UID) as other,
    ):
        await nobody.call("create_session", name="65534-nobody-1")
        await nobody.call("create_session", name="65534-nobody-2")
        with pytest.raises(QuotaExceeded, match=f"uid {NOBODY}.*maximum of 2 sessions"):
            await nobody.call("create_session", name="65534-nobody-3")
        await other.call("create_session", name=f"{OTHER_UID}-other-1")
        await other.call("create_session", name=f"{OTHER_UID}-other-2")
        with pytest.raises(QuotaExceeded, match="maximum of 2 sessions"):
            await other.call("create_session", name=f"{OTHER_UID}-other-3")
        await root.create_session("root-1")
        assert await session_names(root) == sorted([
            "65534-nobody-1", "65534-nobody-2", f"{OTHER_UID}-other-1",
            f"{OTHER_UID}-other-2", "root-1",
        ])
        await nobody.call("close", session="65534-nobody-1")
        await nobody.call("create_session", name="65534-nobody-3")


async def test_max_preserved_bytes_is_configurable(host: Host) -> None:
    """The host's limit binds everyone; a uid's own limit (by default a quarter of the
    host's: 25000 here) binds every uid but root, and a tenant's QuotaExceeded tells it
    of its own usage and limit only."""
    await host.start("--max-preserved-bytes", "100000")
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        vm = await root.create_session("vm")
        await preserve(vm, "big", 80000)
        await nobody.call("create_session", name="65534-vm-nobody")
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="rest", data="00",
                          size=20000)
        fds = await host.open_fds(root)
        with pytest.raises(QuotaExceeded, match="limit of 100000 bytes"):
            await preserve(vm, "one-byte", 1)
        with pytest.raises(QuotaExceeded, match="no room for 1 more") as refused:
            await nobody.call("preserve_fd", session="65534-vm-nobody", token="more", data="00")
        assert "100000" not in str(refused.value) and "80000" not in str(refused.value)
        await preserve(vm, "empty", 0)
        assert await host.open_fds(root) == fds + 1
        assert (await vm.properties())["PreservedBytes"] == 80000
        await vm.unpreserve_fd("big")
        with pytest.raises(QuotaExceeded, match=f"uid {NOBODY} holds 20000 bytes; 5001 more "
                           "would pass its limit of 25000 bytes"):
            await nobody.call("preserve_fd", session="65534-vm-nobody", token="more",
                              data="00", size=5001)
        assert await host.open_fds(root) == fds + 1 - 1
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="more", data="00",
                          size=5000)
        await preserve(vm, "fits", 75000)


async def test_the_preserved_bytes_limit_holds_for_what_freeze_would_carry(host: Host) -> None:
    """A memfd that grows after PreserveFd still counts at its real size: the update
    cannot freeze with more than the limit preserved."""
    await host.start("--max-preserved-bytes", "100000")
    async with await host.connect() as root:
        vm = await root.create_session("vm")
        ram = make_memfd(4096, b"small at first")
        await vm.preserve_fd("ram", ram)
        os.ftruncate(ram, 1 << 20)  # the same file the daemon holds
        os.pwrite(ram, b"grown", (1 << 20) - 5)
        await root.prepare()
        with pytest.raises(QuotaExceeded, match="100000"):
            await root.freeze()
        assert await root.state() == "prepared"
        await root.cancel()
        os.ftruncate(ram, 4096)
        await root.prepare()
        await root.freeze()
        assert await root.state() == "frozen"
        os.close(ram)
