"""sd_notify as systemd sees it: READY, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC, STOPPING."""

import os

from liveupdated.client import Client
from liveupdated.sandbox import DaemonProcess
from tests.conftest import DaemonFactory, make_memfd


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
    messages = daemon.notifications.messages
    extend = [i for i, m in enumerate(messages) if m.startswith("EXTEND_TIMEOUT_USEC=")]
    stopping = messages.index("STOPPING=1")
    assert extend and extend[0] < stopping


def test_sigterm_stops_cleanly_with_stopping(daemon: DaemonProcess) -> None:
    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.notifications.messages
