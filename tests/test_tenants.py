"""A second uid against root's VMs, over a real bus: nothing it does harms another VM.

uid 65534 is the tenant (tests/other_uid.py); root plays the host and its own VMMs.
Each test is one way a tenant tried to destroy, veto or starve, and what it gets now.
"""

import os
from pathlib import Path

import pytest

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import (
    AccessDenied,
    DependencyMissing,
    InvalidArgument,
    NoSuchSession,
    QuotaExceeded,
    SessionExists,
    WrongState,
)
from liveupdated.core.names import MAX_REQUIRES, session_path
from liveupdated.privatebus import PrivateBus
from tests.conftest import DaemonFactory, Host, make_memfd
from tests.other_uid import OtherUid
from tests.rules_support import gone_from_bus

NOBODY = 65534


async def _root_vm(vmm: Client, name: str = "vm-root") -> tuple[SessionClient, int]:
    session = await vmm.create_session(name)
    fd = make_memfd(4096, b"root's guest memory")
    await session.preserve_fd("ram", fd)
    return session, fd


@pytest.mark.parametrize("count", [MAX_REQUIRES + 1, 1000, 20_000])
async def test_a_requires_over_the_bound_is_refused_and_harms_no_later_session(
    host: Host, bus: PrivateBus, count: int
) -> None:
    """20,000 names in one requires once made a 1.3 MB journal frame that the next
    start took for a torn tail, cutting off root's session recorded after it."""
    host.start_now()
    async with OtherUid(bus.address) as nobody, await Client.connect(bus.address) as vmm:
        await nobody.call("create_session", name=f"{NOBODY}-vm")
        names = [f"t{i:05d}".ljust(63, "x") for i in range(count)]
        with pytest.raises(InvalidArgument, match=f"at most {MAX_REQUIRES}"):
            await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="ram",
                              data="00", size=4096, requires=names)
        await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="ok", data="01",
                          size=4096, requires=names[:MAX_REQUIRES])
        _, fd = await _root_vm(vmm)
        host.crash_now()
        session = SessionClient(vmm, "vm-root", session_path("vm-root"))
        back = await session.retrieve_fd("ram")
        assert os.pread(back, 19, 0) == b"root's guest memory"
        os.close(back)
        assert [f[0] for f in await nobody.call("list_fds", session=f"{NOBODY}-vm")] == ["ok"]
        os.close(fd)


async def test_a_tenants_session_names_start_with_its_uid(
    client: Client, bus: PrivateBus
) -> None:
    await client.create_session("vm42")  # root names freely
    async with OtherUid(bus.address) as nobody:
        for name in ("vm42", "vm43", "1000-vm", f"{NOBODY}", f"{NOBODY}vm"):
            with pytest.raises(InvalidArgument, match=f"'{NOBODY}-<name>'"):
                await nobody.call("create_session", name=name)
        await nobody.call("create_session", name=f"{NOBODY}-vm42")
        with pytest.raises(SessionExists):
            await client.create_session(f"{NOBODY}-vm42")
    await gone_from_bus(client, nobody.unique_name)  # its departure, then our call: in order
    assert [s.name for s in await client.list_sessions()] == ["vm42"]  # the tenant left


@pytest.mark.parametrize("host_bytes", [4 << 40, 1 << 20])
async def test_a_tenant_cannot_take_the_hosts_byte_budget(
    start_daemon: DaemonFactory, bus: PrivateBus, host_bytes: int
) -> None:
    """A sparse memfd costs no RAM but counts at its apparent size (what the kernel
    backend pins): one tenant gets a quarter of the host's budget, and its error tells
    it of its own usage and limit, not of the host's total."""
    start_daemon("--max-preserved-bytes", str(host_bytes))
    share = host_bytes // 4
    async with OtherUid(bus.address) as nobody, await Client.connect(bus.address) as vmm:
        await nobody.call("create_session", name=f"{NOBODY}-vm")
        with pytest.raises(QuotaExceeded) as refused:
            await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="huge",
                              size=3 * share)
        message = str(refused.value)
        assert f"uid {NOBODY} holds 0 bytes" in message and f"limit of {share}" in message
        assert str(host_bytes) not in message
        await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="share", size=share)
        with pytest.raises(QuotaExceeded, match=f"uid {NOBODY} holds {share} bytes"):
            await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="more", size=1)
        session = await vmm.create_session("vm-root")
        fd = make_memfd(host_bytes - share, b"root")
        await session.preserve_fd("ram", fd)  # root still has the rest of the host
        os.close(fd)


async def test_a_memfd_grown_after_prepare_blocks_freeze_by_name_until_dropped(
    client: Client, bus: PrivateBus
) -> None:
    _, fd = await _root_vm(client)
    async with OtherUid(bus.address) as nobody:
        await nobody.call("create_session", name=f"{NOBODY}-vm")
        await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="ram", size=4096,
                          keep=True)
        await client.prepare()
        await nobody.call("resize", session=f"{NOBODY}-vm", token="ram", size=5 << 40)
        with pytest.raises(QuotaExceeded, match=f"Sessions blocking: {NOBODY}-vm\\."):
            await client.freeze()
        assert await client.state() == "prepared"
        with pytest.raises(AccessDenied):
            await nobody.call("drop_session", name=f"{NOBODY}-vm", reason="mine")
        await client.drop_session(f"{NOBODY}-vm", "grew to 5 TiB after Prepare")
        await client.freeze()
        assert [s.name for s in await client.list_sessions()] == ["vm-root"]
        with pytest.raises(NoSuchSession):
            await nobody.call("list_fds", session=f"{NOBODY}-vm")
    os.close(fd)


async def test_a_requirement_that_never_comes_names_the_blocking_session(
    client: Client, bus: PrivateBus
) -> None:
    _, fd = await _root_vm(client)
    async with OtherUid(bus.address) as nobody:
        await nobody.call("create_session", name=f"{NOBODY}-vm")
        await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="ram", size=4096,
                          requires=["never"])
        await client.prepare()
        with pytest.raises(DependencyMissing) as refused:
            await client.freeze()
        assert f"Sessions blocking: {NOBODY}-vm." in str(refused.value)
        assert "vm-root" not in str(refused.value)
        await client.drop_session(f"{NOBODY}-vm", "requires a token it never preserved")
        await client.freeze()
        await client.reboot()
    os.close(fd)


async def test_drop_session_is_roots_and_only_before_freeze(
    client: Client, bus: PrivateBus, tmp_path: Path
) -> None:
    await _root_vm(client, "vm-a")
    await _root_vm(client, "vm-b")
    with pytest.raises(NoSuchSession):
        await client.drop_session("vm-none", "")
    with pytest.raises(InvalidArgument, match="at most 200"):
        await client.drop_session("vm-a", "x" * 201)
    with pytest.raises(InvalidArgument):
        await client.drop_session("vm-a", "line\nbreak")
    await client.drop_session("vm-a", "decommissioned")  # in NORMAL
    await client.prepare()
    await client.freeze()
    with pytest.raises(WrongState, match="DropSession is allowed in state normal or prepared"):
        await client.drop_session("vm-b", "too late")
    assert [s.name for s in await client.list_sessions()] == ["vm-b"]


async def test_per_uid_fd_budget_is_configurable_and_roots_sessions_are_not_bound(
    start_daemon: DaemonFactory, bus: PrivateBus
) -> None:
    start_daemon("--max-fds-per-uid", "3", "--max-bytes-per-uid", "20000")
    async with OtherUid(bus.address) as nobody, await Client.connect(bus.address) as vmm:
        for name in (f"{NOBODY}-a", f"{NOBODY}-b"):
            await nobody.call("create_session", name=name)
        for token in ("x", "y"):
            await nobody.call("preserve_fd", session=f"{NOBODY}-a", token=token, size=4096)
        await nobody.call("preserve_fd", session=f"{NOBODY}-b", token="x", size=4096)
        with pytest.raises(QuotaExceeded, match=f"uid {NOBODY} holds 3 fds"):
            await nobody.call("preserve_fd", session=f"{NOBODY}-b", token="y", size=1)
        await nobody.call("unpreserve_fd", session=f"{NOBODY}-b", token="x")
        with pytest.raises(QuotaExceeded, match=f"uid {NOBODY} holds 8192 bytes"):
            await nobody.call("preserve_fd", session=f"{NOBODY}-b", token="z", size=16384)
        await nobody.call("preserve_fd", session=f"{NOBODY}-b", token="z", size=8192)
        session = await vmm.create_session("vm-root")
        fds = [make_memfd(65536, b"root") for _ in range(5)]
        for i, fd in enumerate(fds):
            await session.preserve_fd(f"t{i}", fd)
        for fd in fds:
            os.close(fd)
