"""sd_notify as systemd sees it: READY, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC, STOPPING,
and the fd store's BARRIER=1."""

import asyncio
import os

from liveupdated.client import Client
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import DaemonFactory, fd_links, is_barrier, make_memfd
from tests.rules_support import eventually


async def test_ready_comes_after_the_bus_name_is_owned(daemon: DaemonProcess,
                                                       client: Client) -> None:
    (owned,) = await client.call("/org/freedesktop/DBus", "org.freedesktop.DBus",
                                 "NameHasOwner", "s", ["org.liveupdate1"],
                                 destination="org.freedesktop.DBus")
    assert owned is True
    ready = [m for m in daemon.notifications.messages if "READY=1" in m]
    assert ready == ["READY=1\nSTATUS=normal, 0 sessions, 0 fds"]


async def test_status_follows_the_state(daemon: DaemonProcess, client: Client) -> None:
    session = await client.create_session("vm")
    fd = make_memfd()
    await session.preserve_fd("ram", fd)
    await client.prepare()
    assert daemon.notifications.wait_for(
        lambda n: "STATUS=prepared, 1 sessions, 1 fds" in n.messages, 10
    )
    os.close(fd)


def test_watchdog_pings_at_half_the_interval(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon(env={"WATCHDOG_USEC": "200000"})
    assert daemon.notifications.wait_for(
        lambda n: sum(m == "WATCHDOG=1" for m in n.messages) >= 3, 10
    )


async def test_reboot_extends_the_timeout_and_stopping_is_said(
    daemon: DaemonProcess, client: Client
) -> None:
    await client.prepare()
    await client.freeze()
    await client.reboot()
    assert daemon.wait() == 0
    daemon.notifications.settle()  # its exit says nothing of the socket's reader
    messages = daemon.notifications.messages
    extend = [i for i, m in enumerate(messages) if m.startswith("EXTEND_TIMEOUT_USEC=")]
    stopping = messages.index("STOPPING=1")
    assert extend and extend[0] < stopping


def test_sigterm_stops_cleanly_with_stopping(daemon: DaemonProcess) -> None:
    assert daemon.stop() == 0
    daemon.notifications.settle()
    assert "STOPPING=1" in daemon.notifications.messages


async def test_every_fd_store_barrier_ends_once_the_manager_has_read_it(
    daemon: DaemonProcess, client: Client, bus: PrivateBus
) -> None:
    """A barrier is a pipe the daemon holds until the manager has read what came before
    it: one a call waits on is closed by its answer, one after a departed client's drop
    (no call waits on it) once the manager reads on; none is left behind."""

    async def barriers() -> int:
        return sum(is_barrier(link) for link in fd_links(daemon.pid))

    async def some_barrier() -> bool:
        return await barriers() > 0

    async def no_barrier() -> bool:
        return await barriers() == 0

    session = await client.create_session("vm")
    fd = make_memfd(4096, b"ram")
    daemon.notifications.pause()
    try:
        call = asyncio.ensure_future(session.preserve_fd("ram", fd))
        await eventually(some_barrier, "the PreserveFd's barrier to be sent")
        assert not call.done()
    finally:
        daemon.notifications.resume()
    await call
    assert await barriers() == 0  # closed before the answer

    async with await Client.connect(bus.address) as leaving:
        gone = await leaving.create_session("vm-gone")
        await gone.preserve_fd("ram", fd)
        daemon.notifications.pause()
    try:
        await eventually(some_barrier, "the departed client's drop to send a barrier")
    finally:
        daemon.notifications.resume()
    await eventually(no_barrier, "the drop's barrier to end")
    assert daemon.notifications.wait_for(lambda n: set(n.store) == {"vm/ram"}, 10)
    os.close(fd)
