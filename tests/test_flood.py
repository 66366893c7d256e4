"""One uid that floods the daemon and never reads stalls no one else, on both buses.

The bus (dbus-daemon) charges the daemon's replies still queued for a client that does
not read to the *daemon's* incoming limits (max_incoming_unix_fds 64): at the limit it
stops reading the daemon, and everyone waits; dbus-broker disconnects the daemon
instead. The daemon bounds what it has written and a client has not yet taken (docs/API.md,
flow control). Each test runs against a private dbus-daemon and a private dbus-broker,
both with the system bus's policy and the project's policy file, and a flooder of uid
65534 on several connections that pipelines 128 calls on each and never reads.
"""

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated.bus import MANAGER_INTERFACE, SESSION_INTERFACE
from liveupdated.client import Client
from liveupdated.core.names import MANAGER_PATH, session_path
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import make_memfd, open_fds
from tests.test_bus_limits import LONG_NAMES, NOBODY, RawClient, create_sessions, outcome

CALLS = 128  # the system bus's max_replies_per_connection
# Seconds, for root's calls during the flood. Starved, they wait as long as the flood
# lasts (below); answered, a PreserveFd's fsync and store barrier on a busy 2-core
# machine have been seen near a second, so the bound leaves room for that.
ANSWER_WITHIN = 3.0
# Measured before flow control (dbus-daemon 1.14): 40 connections of 64 ListSessions
# and 64 RetrieveFd left root's State read unanswered for as long as the flood stayed,
# with 1,900 fds held in the daemon's writer; 20 connections of unread PreserveFds left
# hundreds of the flooder's memfds in the daemon.
CONNECTIONS = {"ListSessions+RetrieveFd": 40, "PreserveFd": 20}


@pytest.fixture(params=["dbus-daemon", "dbus-broker"])
def bus(request: pytest.FixtureRequest) -> Iterator[PrivateBus]:
    if os.geteuid() != 0:
        pytest.skip("a flooder of another uid needs root")
    if shutil.which(request.param) is None:
        pytest.skip(f"{request.param} is not installed (scripts/setup.sh installs it)")
    directory = Path(tempfile.mkdtemp(prefix="lud-flood-"))
    with PrivateBus(directory, policy="system", implementation=request.param) as private_bus:
        yield private_bus
    shutil.rmtree(directory, ignore_errors=True)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def flooders(bus: PrivateBus, count: int) -> tuple[RawClient, list[RawClient]]:
    """A connection of uid 65534 that made its 64 sessions (the longest names: big
    ListSessions answers) and preserved "t" in the first; `count` more to flood with."""
    first = RawClient.connect_as(NOBODY, bus)
    create_sessions(first, LONG_NAMES)
    fd = make_memfd(4096)
    try:
        first.send(session_path(LONG_NAMES[0]), SESSION_INTERFACE, "PreserveFd", "shas",
                   ["t", 0, []], fds=[fd])
        assert outcome(first.replies(1)[0]) == "ok"
    finally:
        os.close(fd)
    return first, [RawClient.connect_as(NOBODY, bus) for _ in range(count)]


async def within(seconds: float, what: str, call: "asyncio.Future[object] | object") -> float:
    """How long `call` (an awaitable) took; fails if more than `seconds`."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            await call  # type: ignore[misc]
    except TimeoutError:
        raise AssertionError(f"{what} not answered within {seconds}s during the flood") from None
    return time.monotonic() - started


async def roots_calls_answer(client: Client, round_: int) -> None:
    """Root's State read and PreserveFd, each answered within ANSWER_WITHIN."""
    await within(ANSWER_WITHIN, "root's State read", client.state())
    async with asyncio.timeout(5):
        session = await client.create_session(f"root-vm-{round_}")
    fd = make_memfd(4096)
    try:
        await within(ANSWER_WITHIN, "root's PreserveFd", session.preserve_fd("ram", fd))
    finally:
        os.close(fd)


async def settles_to(pid: int, baseline: int, client: Client) -> int:
    """The daemon's fd count once it is back to `baseline` (departures are noticed by
    NameOwnerChanged, asynchronously), or what it is after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        async with asyncio.timeout(5):
            await client.state()  # a round trip: replies' fds are closed by then
        count = open_fds(pid)
        if count <= baseline or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


async def flood_and_check(bus: PrivateBus, daemon: DaemonProcess, send: str) -> None:
    async with await Client.connect(bus.address) as client:
        await client.state()
        baseline = open_fds(daemon.pid)
        first, raws = flooders(bus, CONNECTIONS[send])
        rss_before = rss_kib(daemon.pid)
        for n, raw in enumerate(raws):
            for i in range(CALLS):
                if send == "PreserveFd":  # each call carries a memfd of its own
                    memfd = make_memfd(4096)
                    raw.send(session_path(LONG_NAMES[n]), SESSION_INTERFACE, "PreserveFd",
                             "shas", [f"c{n}-{i}", 0, []], fds=[memfd])
                    os.close(memfd)
                elif i < CALLS // 2:  # big answers that fill the flooder's socket
                    raw.send(MANAGER_PATH, MANAGER_INTERFACE, "ListSessions")
                else:  # then answers that carry an fd each
                    raw.send(session_path(LONG_NAMES[0]), SESSION_INTERFACE, "RetrieveFd",
                             "s", ["t"])
        for round_ in range(3):
            await roots_calls_answer(client, round_)
        assert daemon.process is not None and daemon.process.poll() is None
        grown = rss_kib(daemon.pid) - rss_before
        assert grown < 64 << 10, f"the daemon's RSS grew by {grown} KiB during the flood"

        for raw in [first, *raws]:
            raw.close()
        # Root's 3 sessions hold an fd each; the flooder's sessions went with it.
        assert await settles_to(daemon.pid, baseline + 3, client) == baseline + 3
        await roots_calls_answer(client, 3)
        stored = {name for name, _ in daemon.notifications.stored()}
        assert {f"root-vm-{i}/ram" for i in range(4)} <= stored
    assert daemon.process.poll() is None
    assert "fd_store_failed" not in daemon_log(daemon)


def daemon_log(daemon: DaemonProcess) -> str:
    assert daemon.log is not None
    daemon.log.flush()
    return Path(daemon.log.name).read_text(errors="replace")


@pytest.mark.parametrize("send", list(CONNECTIONS))
async def test_a_flood_that_is_never_read_stalls_no_one(
    bus: PrivateBus, daemon: DaemonProcess, send: str
) -> None:
    await flood_and_check(bus, daemon, send)


async def test_losing_the_bus_is_one_line_and_an_exit_for_a_restart(
    bus: PrivateBus, daemon: DaemonProcess
) -> None:
    """The bus goes while hundreds of calls wait on it (each caller's credentials) and on
    the daemon: the daemon exits non-zero at once, with one line and no traceback."""
    raws = [RawClient.connect_as(NOBODY, bus) for _ in range(8)]
    for raw in raws:
        for _ in range(CALLS):
            raw.send(MANAGER_PATH, MANAGER_INTERFACE, "ListSessions")
    async with await Client.connect(bus.address) as client:
        await client.state()  # the daemon has read (at least some of) the flood
    bus.kill()
    status = await asyncio.to_thread(daemon.wait, 10)
    assert status != 0
    for raw in raws:
        raw.close()
    log = daemon_log(daemon)
    assert "Traceback" not in log and "internal_error" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith(("<3>", "<2>"))]
    assert len(errors) == 1 and "exiting_for_a_restart" in errors[0], errors


async def test_root_vmms_that_stop_reading_hold_no_other_root_vmms_fds(
    bus: PrivateBus, tmp_path: Path
) -> None:
    """The host's own VMMs (root) are bounded each alone: 40 of them each asking for an fd
    and then reading nothing for a while (a VMM busy loading its guest) do not keep a 41st
    from its fds. A budget shared by all of root's connections did: after a soft-reboot
    of 64 VMMs, 30 never got their fds back."""
    state = tmp_path / "state"
    with DaemonProcess(bus.address, state) as daemon:
        async with await Client.connect(bus.address) as vmm:
            session = await vmm.create_session("vm")
            fd = make_memfd(4096, b"guest")
            await session.preserve_fd("ram", fd)
            os.close(fd)
            open_fds_before = open_fds(daemon.pid)
            busy = [RawClient.connect_as(0, bus) for _ in range(40)]
            for client in busy:  # each asks for the fd, and reads nothing meanwhile
                client.send(session_path("vm"), SESSION_INTERFACE, "RetrieveFd", "s", ["ram"])
            for _ in range(16):
                retrieved = asyncio.ensure_future(session.retrieve_fd("ram"))
                await within(ANSWER_WITHIN, "another root VMM's RetrieveFd", retrieved)
                os.close(retrieved.result())
            for client in busy:  # once they read, each has its answer
                assert outcome(client.replies(1)[0]) == "ok"
                client.close()
            # Whatever became of their answers, nothing of theirs stays in the daemon.
            assert await settles_to(daemon.pid, open_fds_before, vmm) <= open_fds_before
        assert daemon.process is not None and daemon.process.poll() is None
