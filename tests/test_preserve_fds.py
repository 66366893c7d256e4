"""PreserveFds over a real bus: several fds in one call, preserved all together or not at
all; a refused call names the token at fault, keeps none of its fds and changes nothing.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from liveupdated.bus import BUS_NAME, MAX_FDS_PER_MESSAGE, SESSION_INTERFACE
from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import (
    InvalidArgument,
    LiveUpdateError,
    QuotaExceeded,
    TokenExists,
    UnsupportedFd,
)
from liveupdated.core.records import FdPreserved
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd
from tests.other_uid import content_digest, digest
from tests.rules_support import Host, journal_frames


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


def guest(token: str, size: int = 1 << 16) -> int:
    return make_memfd(size, f"content of {token}".encode(), name=token)


async def test_fds_are_preserved_together_with_their_dependencies(host: Host) -> None:
    await host.start()
    async with await host.connect() as root:
        vm = await root.create_session("vm")
        wanted = [("ram0", ()), ("ram1", ()), ("kvm", ("ram0", "ram1"))]
        fds = [guest(token) for token, _ in wanted]
        await vm.preserve_fds([(t, fd, r) for (t, r), fd in zip(wanted, fds, strict=True)])
        for fd in fds:
            os.close(fd)
        listed = {info.token: list(info.requires) for info in await vm.list_fds()}
        assert listed == {"ram0": [], "ram1": [], "kvm": ["ram0", "ram1"]}
        preserved = [r.token for r in host.journal_records() if isinstance(r, FdPreserved)]
        assert preserved == ["ram0", "ram1", "kvm"]
        *_, (_, _, last) = journal_frames(host.journal_path)  # one frame: all or none
        assert [r.token for r in last if isinstance(r, FdPreserved)] == ["ram0", "ram1", "kvm"]
        assert {"vm/ram0", "vm/ram1", "vm/kvm"} <= host.stored_fd_names()

        await host.restart(crash=True)  # every fd is back from the fd store
        for token, _ in wanted:
            fd = await vm.retrieve_fd(token)
            assert digest(fd) == content_digest(f"content of {token}".encode(), 1 << 16)
            os.close(fd)
        await root.prepare()
        await root.freeze()  # the dependencies declared in the one call are all there
        await root.cancel()


async def test_more_fds_than_a_message_may_carry_are_refused_by_the_client(host: Host) -> None:
    """dbus-daemon drops a client that sends more than 16 fds in one message; the client
    library says so before sending, and the connection stays usable."""
    await host.start()
    async with await host.connect() as root:
        vm = await root.create_session("vm")
        fd = guest("ram")
        try:
            with pytest.raises(InvalidArgument, match="at most 16 fds a call"):
                await vm.preserve_fds([(f"t{i}", fd, ()) for i in range(MAX_FDS_PER_MESSAGE + 1)])
            await vm.preserve_fds([(f"t{i}", fd, ()) for i in range(MAX_FDS_PER_MESSAGE)])
        finally:
            os.close(fd)
        assert len(await vm.list_fds()) == MAX_FDS_PER_MESSAGE


async def refused(
    host: Host, root: Client, vm: SessionClient, fds: list[tuple[str, int, tuple[str, ...]]],
    error: type[LiveUpdateError], message: str,
) -> None:
    """The call fails as told, and leaves the session, the journal and the daemon's
    open fds as they were."""
    before = (await vm.list_fds(), host.journal_records(), await host.open_fds(root))
    with pytest.raises(error, match=message):
        await vm.preserve_fds(fds)
    after = (await vm.list_fds(), host.journal_records(), await host.open_fds(root))
    assert after == before


async def test_one_bad_fd_refuses_them_all(host: Host) -> None:
    await host.start("--max-fds-per-session", "4")
    async with await host.connect() as root:
        vm = await root.create_session("vm")
        held = guest("held")
        await vm.preserve_fd("held", held, ["later"])  # a requirement still to come
        good, other = guest("good"), guest("other")
        read_end, write_end = os.pipe()
        try:
            await refused(host, root, vm, [("good", good, ()), ("pipe", read_end, ())],
                          UnsupportedFd, r"token 'pipe'.*a pipe, not a memfd")
            await refused(host, root, vm, [("good", good, ()), ("held", other, ())],
                          TokenExists, r"already holds token 'held'")
            await refused(host, root, vm, [("good", good, ()), ("good", other, ())],
                          InvalidArgument, r"names token 'good' twice")
            await refused(host, root, vm, [("a", good, ("b",)), ("b", other, ("a",))],
                          InvalidArgument, r"cycle: a -> b -> a")
            await refused(host, root, vm, [("later", good, ("held",))],
                          InvalidArgument, r"cycle: later -> held -> later")
            await refused(host, root, vm, [("bad name", good, ())],
                          InvalidArgument, r"A-Za-z0-9_\.-")
            await refused(host, root, vm, [(f"t{i}", fd, ()) for i, fd in
                                           enumerate([good, other, write_end, read_end])],
                          QuotaExceeded, r"holds 1 fds; 4 more would pass the maximum of 4")
            await vm.preserve_fds([("later", good, ()), ("other", other, ("later",))])
            assert sorted(info.token for info in await vm.list_fds()) == [
                "held", "later", "other"]
        finally:
            for fd in (held, good, other, read_end, write_end):
                os.close(fd)


async def raw_call(address: str, path: str, member: str, signature: str, body: list[Any],
                   fds: list[int]) -> Message:
    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(destination=BUS_NAME, path=path,
                                       interface=SESSION_INTERFACE, member=member,
                                       signature=signature, body=body, unix_fds=fds))
        assert reply is not None
        return reply
    finally:
        bus.disconnect()


@pytest.mark.parametrize(
    ("member", "signature", "body", "passed"),
    [
        ("PreserveFds", "a(shas)", [[["a", 0, []], ["b", 0, []]]], 1),  # one fd, two tokens
        ("PreserveFds", "a(shas)", [[["a", 0, []], ["b", 2, []]]], 2),  # no fd 2
        ("PreserveFds", "a(shas)", [[["a", 0, []]]], 0),  # an index, no fds at all
        ("PreserveFd", "shas", ["a", 0, []], 0),
        ("PreserveFd", "shas", ["a", 1, []], 1),
    ],
)
async def test_fd_arguments_must_name_passed_fds(
    host: Host, member: str, signature: str, body: list[Any], passed: int
) -> None:
    await host.start()
    async with await host.connect() as root:
        vm = await root.create_session("vm")
        before = await host.open_fds(root)
        fds = [guest(f"g{i}") for i in range(passed)]
        try:
            reply = await raw_call(host.address, vm.path, member, signature, body, fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == "org.liveupdate1.Error.InvalidArgument"
        assert "passed fd" in reply.body[0]
        assert await vm.list_fds() == []
        assert await host.open_fds(root) == before
