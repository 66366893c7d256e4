"""Dependencies over a real bus: `requires` names tokens of the same session.

Freeze checks every session and fails with DependencyMissing naming each missing
session/token before anything irreversible, UnpreserveFd of a required token is refused
naming its dependents, and a cycle is refused at PreserveFd.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated.client import SessionClient
from liveupdated.core.errors import DependencyMissing, InvalidArgument
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd
from tests.other_uid import OtherUid
from tests.rules_support import NOBODY, Host


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


async def preserve(session: SessionClient, token: str, requires: list[str] | None = None) -> None:
    fd = make_memfd(4096, token.encode())
    try:
        await session.preserve_fd(token, fd, requires or [])
    finally:
        os.close(fd)


async def fds_of(session: SessionClient) -> list[tuple[str, list[str]]]:
    return [(f.token, f.requires) for f in await session.list_fds()]


async def test_freeze_names_every_missing_token_and_stays_prepared(host: Host) -> None:
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        a = await root.create_session("vm-a")
        await preserve(a, "ram")
        await preserve(a, "kvm", ["ram", "vfio"])
        await preserve(a, "net", ["tap"])
        await nobody.call("create_session", name="65534-vm-b")
        await nobody.call("preserve_fd", session="65534-vm-b", token="disk", data="00",
                          requires=["ram"])
        ok = await root.create_session("vm-ok")
        await preserve(ok, "ram")
        await preserve(ok, "kvm", ["ram"])
        await root.prepare()
        fd_count = await host.open_fds(root)

        with pytest.raises(DependencyMissing) as failure:
            await root.freeze()
        message = str(failure.value)
        for missing in ("vm-a/vfio", "vm-a/tap", "65534-vm-b/ram"):
            assert missing in message, f"{missing} not named in: {message}"
        assert "vm-ok" not in message
        assert "vm-a/ram" not in message
        assert await root.state() == "prepared"
        assert host.handover_files() == []
        assert await host.open_fds(root) == fd_count
        states = {s.name: s.state for s in await root.list_sessions()}
        assert states == {"vm-a": "prepared", "65534-vm-b": "prepared", "vm-ok": "prepared"}

        # Nothing irreversible happened: cancel, fix, and the update goes through.
        await root.cancel()
        await preserve(a, "vfio")
        await preserve(a, "tap")
        await nobody.call("preserve_fd", session="65534-vm-b", token="ram", data="00")
        await root.prepare()
        await root.freeze()
        assert await root.state() == "frozen"


async def test_requires_are_satisfied_only_within_the_same_session(host: Host) -> None:
    await host.start()
    async with await host.connect() as root:
        memory = await root.create_session("vm-memory")
        await preserve(memory, "ram")
        device = await root.create_session("vm-device")
        await preserve(device, "vfio", ["ram"])
        await root.prepare()
        with pytest.raises(DependencyMissing, match="vm-device/ram"):
            await root.freeze()
        assert await root.state() == "prepared"


async def test_unpreserve_of_a_required_token_is_refused_naming_its_dependents(
    host: Host,
) -> None:
    await host.start()
    async with await host.connect() as root:
        vm = await root.create_session("vm")
        await preserve(vm, "ram")
        await preserve(vm, "kvm", ["ram"])
        await preserve(vm, "vfio", ["ram"])
        await preserve(vm, "net")
        before = await fds_of(vm)
        fd_count = await host.open_fds(root)

        with pytest.raises(DependencyMissing) as failure:
            await vm.unpreserve_fd("ram")
        assert "kvm" in str(failure.value) and "vfio" in str(failure.value)
        assert "net" not in str(failure.value)
        assert await fds_of(vm) == before
        assert await host.open_fds(root) == fd_count

        await vm.unpreserve_fd("kvm")
        with pytest.raises(DependencyMissing, match="vfio"):
            await vm.unpreserve_fd("ram")
        await vm.unpreserve_fd("vfio")
        await vm.unpreserve_fd("ram")
        assert await fds_of(vm) == [("net", [])]
        assert await host.open_fds(root) == fd_count - 3


CYCLES: dict[str, tuple[list[tuple[str, list[str]]], str, list[str]]] = {
    "self": ([], "a", ["a"]),
    "two": ([("a", ["b"])], "b", ["a"]),
    "three": ([("a", ["c"]), ("b", ["a"])], "c", ["b"]),
    "long": ([("a", ["b", "x"]), ("b", ["c"]), ("c", ["d"])], "d", ["y", "a"]),
}


async def test_a_dependency_cycle_is_refused_at_preserve(host: Host) -> None:
    await host.start()
    async with await host.connect() as root:
        for name, (existing, token, requires) in CYCLES.items():
            vm = await root.create_session(f"vm-{name}")
            for t, r in existing:
                await preserve(vm, t, r)
            before = await fds_of(vm)
            fd_count = await host.open_fds(root)
            with pytest.raises(InvalidArgument, match="cycle"):
                await preserve(vm, token, requires)
            assert await fds_of(vm) == before, name
            assert await host.open_fds(root) == fd_count, name
        # The same requires are fine when they close no cycle.
        await preserve(await root.create_session("vm-acyclic"), "a", ["b"])


async def test_requires_lists_are_validated(host: Host) -> None:
    await host.start()
    async with await host.connect() as root:
        vm = await root.create_session("vm")
        await preserve(vm, "ram")
        for bad in (["ram", "ram"], ["bad token"], [""], ["a/b"], ["x" * 64]):
            with pytest.raises(InvalidArgument):
                await preserve(vm, "kvm", bad)
        assert await fds_of(vm) == [("ram", [])]
