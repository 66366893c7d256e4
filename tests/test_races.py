"""Commands pipelined on the bus, checked against the model of the phases.

Every pair of host commands is sent without waiting for the first reply, from every
state where one of them applies; each session command that races a host command is
sent the same way. Whatever the daemon answers, the outcome must be one the phases
allow (successes form a valid path, refusals are named contract errors), durable
across a kill -9, and no fd may be lost or leaked.
"""

import asyncio
import itertools
import os
from collections.abc import Awaitable, Sequence

import pytest

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import LiveUpdateError, NoSuchSession, WrongState
from liveupdated.core.names import session_path
from liveupdated.privatebus import PrivateBus
from tests.conftest import Host, make_memfd, memfds_held

HOST_COMMANDS = ("prepare", "freeze", "cancel", "reboot", "finish")
# The phases' table, as the model of this file states it.
MOVES = {
    ("normal", "prepare"): "prepared",
    ("prepared", "freeze"): "frozen",
    ("prepared", "cancel"): "normal",
    ("frozen", "cancel"): "normal",
    ("frozen", "reboot"): "updated",  # once the next daemon starts
    ("updated", "finish"): "normal",
}
PATH_TO = {
    "normal": [],
    "prepared": ["prepare"],
    "frozen": ["prepare", "freeze"],
    "updated": ["prepare", "freeze", "reboot"],
}
CONTENT = {("vm-a", "ram"): b"A" * 100, ("vm-a", "state"): b"a", ("vm-b", "ram"): b"B" * 7}


def _pairs() -> list[tuple[str, str, str]]:
    """(start state, first, second) wherever at least one of the two applies."""
    return [
        (state, first, second)
        for state in PATH_TO
        for first, second in itertools.product(HOST_COMMANDS, repeat=2)
        if (state, first) in MOVES or (state, second) in MOVES
    ]


async def _outcomes(calls: Sequence[Awaitable[object]]) -> list[BaseException | None]:
    """Send all, then wait for all: pipelined on one connection, in this order."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


async def _reach(host: Host, vmm: Client, state: str) -> list[int]:
    fds = []
    for (name, token), data in CONTENT.items():
        if token == "ram":
            await vmm.create_session(name)
        fd = make_memfd(4096, data)
        fds.append(fd)
        requires = ["ram"] if token == "state" else []
        await SessionClient(vmm, name, session_path(name)).preserve_fd(token, fd, requires)
    for step in PATH_TO[state]:
        await getattr(vmm, step)()
    if state == "updated":
        assert host.daemons[-1].wait() == 0
        host.start_now()
    return fds


def _valid_path(state: str, succeeded: Sequence[str]) -> str | None:
    """The state the successes lead to, in some order the table allows; None if none."""
    for order in itertools.permutations(succeeded):
        current: str | None = state
        for command in order:
            current = MOVES.get((current, command)) if current else None
        if current is not None:
            return current
    return None


async def _check_fds(vmm: Client, state: str) -> None:
    """Every preserved fd is there and byte-exact (unless Finish let them go)."""
    sessions = sorted(s.name for s in await vmm.list_sessions())
    if state == "normal" and not sessions:
        return  # a Finish released them all, as it must
    assert sessions == ["vm-a", "vm-b"]
    if state in ("prepared", "frozen"):
        return  # RetrieveFd is for normal and updated; the restart test holds the rest
    for (name, token), data in CONTENT.items():
        if state == "updated":
            await vmm.retrieve_session(name)
        fd = await SessionClient(vmm, name, session_path(name)).retrieve_fd(token)
        assert os.pread(fd, len(data) + 1, 0) == data + b"\0"
        os.close(fd)


@pytest.mark.parametrize(("state", "first", "second"), _pairs())
async def test_two_host_commands_pipelined(
    host: Host, bus: PrivateBus, state: str, first: str, second: str
) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        fds = await _reach(host, vmm, state)
        errors = await _outcomes([getattr(vmm, first)(), getattr(vmm, second)()])
        for error in errors:
            assert error is None or isinstance(error, LiveUpdateError), repr(error)
        succeeded = [c for c, e in zip((first, second), errors, strict=True) if e is None]
        expected = _valid_path(state, succeeded)
        assert expected is not None, f"{state}: {first}, {second} -> {errors}"
        if "reboot" in succeeded:
            assert host.daemons[-1].wait() == 0  # the simulated kexec
            host.start_now()
        else:
            host.crash_now()  # what was answered is durable
        assert await vmm.state() == expected
        await _check_fds(vmm, expected)
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("retrieves", [1, 3])
async def test_retrieve_fd_pipelined_with_finish_leaks_nothing(
    host: Host, bus: PrivateBus, retrieves: int
) -> None:
    """A restore under way when Finish lets the session go: the fd is answered
    byte-exact or refused by name, and the daemon holds no memfd afterwards."""
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        fds = await _reach(host, vmm, "updated")
        session = await vmm.retrieve_session("vm-a")
        calls: list[Awaitable[object]] = [session.retrieve_fd("ram") for _ in range(retrieves)]
        results = await asyncio.gather(*calls, vmm.finish(), return_exceptions=True)
        assert results[-1] is None
        for result in results[:-1]:
            if isinstance(result, int):
                assert os.pread(result, 101, 0) == CONTENT[("vm-a", "ram")] + b"\0"
                os.close(result)
            else:
                assert isinstance(result, NoSuchSession | WrongState), repr(result)
        assert await vmm.state() == "normal"
        assert memfds_held(host.daemons[-1].pid) == 0
        assert host.store.store == {}
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("call", ["preserve", "close", "disconnect"])
async def test_a_session_call_pipelined_with_prepare_is_all_or_nothing(
    host: Host, bus: PrivateBus, call: str
) -> None:
    """Decided before Prepare, the call counts; after it, it is refused (or, for a
    departed client, its session is carried). Either way the cycle then carries exactly
    what was acknowledged."""
    host.start_now()
    admin = await Client.connect(bus.address)
    vmm = await Client.connect(bus.address)
    session = await vmm.create_session("vm")
    ram = make_memfd(4096, b"ram")
    extra = make_memfd(4096, b"extra")
    await session.preserve_fd("ram", ram)
    if call == "preserve":
        errors = await _outcomes([session.preserve_fd("extra", extra), admin.prepare()])
        expected = ["extra", "ram"] if errors[0] is None else ["ram"]
    elif call == "close":
        errors = await _outcomes([session.close(), admin.prepare()])
        expected = [] if errors[0] is None else ["ram"]
    else:
        prepared = asyncio.ensure_future(admin.prepare())
        vmm.close()
        errors = await _outcomes([prepared])
        expected = ["ram"] if "vm" in [s.name for s in await admin.list_sessions()] else []
    assert all(e is None or isinstance(e, WrongState) for e in errors), errors
    assert await admin.state() == "prepared"
    await admin.freeze()
    await admin.reboot()
    assert host.daemons[-1].wait() == 0
    host.start_now()
    if expected:
        back = await admin.retrieve_session("vm")
        assert sorted(f.token for f in await back.list_fds()) == expected
        fd = await back.retrieve_fd("ram")
        assert os.pread(fd, 3, 0) == b"ram"
        os.close(fd)
    else:
        assert await admin.list_sessions() == []
    admin.close()
    if call != "disconnect":
        vmm.close()
    os.close(ram)
    os.close(extra)


async def test_an_interrupted_freeze_cannot_decide_for_the_next_one(
    host: Host, bus: PrivateBus
) -> None:
    """Freeze waits on a laggard; Cancel, Prepare and a second Freeze follow. When the
    laggard is ready only the second Freeze may freeze: the first was interrupted."""
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm")
        fd = make_memfd(4096, b"x")
        await session.preserve_fd("ram", fd)
        await session.delay_freeze(True)
        await vmm.prepare()
        first = asyncio.ensure_future(vmm.freeze())
        await asyncio.sleep(0)  # let it send its call first: calls are decided in order
        await vmm.cancel()
        with pytest.raises(WrongState, match="interrupted"):
            await first
        await vmm.prepare()
        second = asyncio.ensure_future(vmm.freeze())
        await asyncio.sleep(0)
        with pytest.raises(WrongState, match="Freeze is under way"):
            await vmm.freeze()  # one Freeze waits at a time
        await session.ready_for_freeze()
        await second
        assert await vmm.state() == "frozen"
    os.close(fd)


async def test_drop_session_releases_a_waiting_freeze(host: Host, bus: PrivateBus) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        fds = []
        for name in ("vm-ok", "vm-stuck"):
            session = await vmm.create_session(name)
            fds.append(make_memfd(4096, name.encode()))
            await session.preserve_fd("ram", fds[-1])
            await session.delay_freeze(True)
        await vmm.prepare()
        await SessionClient(vmm, "vm-ok", session_path("vm-ok")).ready_for_freeze()
        freezing = asyncio.ensure_future(vmm.freeze())
        await asyncio.sleep(0)  # its call goes out first
        await vmm.drop_session("vm-stuck", "never answered the barrier")
        await freezing
        assert [s.name for s in await vmm.list_sessions()] == ["vm-ok"]
        assert sorted(host.store.store) == ["vm-ok/ram"]
    for fd in fds:
        os.close(fd)


async def test_a_session_dropped_behind_its_creation_is_created_then_gone(
    host: Host, bus: PrivateBus
) -> None:
    """CreateSession and a DropSession of it pipelined: the drop is decided before the
    creation is durable. Both succeed, in order; the session is never exported, and the
    daemon goes on serving."""
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        for round_ in range(5):
            name = f"vm-{round_}"
            created, dropped = await _outcomes(
                [vmm.create_session(name), vmm.drop_session(name, "pipelined")])
            assert created is None and dropped is None, (created, dropped)
            assert name not in [s.name for s in await vmm.list_sessions()]
            with pytest.raises(LiveUpdateError):  # never exported, or gone
                await SessionClient(vmm, name, session_path(name)).close()
        session = await vmm.create_session("after")
        assert session.name == "after"
