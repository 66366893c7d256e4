"""Who is calling is asked of the bus once per connection: calls that arrive while the
answer is on its way wait for it, and the pidfd the answer carries (ProcessFD, on
dbus-daemon 1.16 and dbus-broker) is closed once.

The lookups are counted by a bus monitor (BecomeMonitor): it sees each
GetConnectionCredentials the daemon sends, without a hook in the daemon.
"""

import contextlib
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import MessageType
from dbus_fast._private.unmarshaller import Unmarshaller

from liveupdated.bus import MANAGER_INTERFACE, driver
from liveupdated.client import Client
from liveupdated.core.names import MANAGER_PATH
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import open_fds
from tests.test_bus_limits import NOBODY, RawClient, _read_one, outcome

CALLS = 128  # the system bus's bound on a connection's calls awaiting replies
LOOKUP = "GetConnectionCredentials"
MARKER = ":0.0"  # no connection has it


class Monitor:
    """A root connection turned bus monitor for the daemon's credentials lookups."""

    def __init__(self, bus: PrivateBus) -> None:
        self.raw = RawClient.connect_as(0, bus)
        rule = f"type='method_call',interface='{driver.DRIVER}',member='{LOOKUP}'"
        self.raw.send(driver.DRIVER_PATH, "org.freedesktop.DBus.Monitoring", "BecomeMonitor",
                      "asu", [[rule], 0], destination=driver.DRIVER)
        (reply,) = self.raw.replies(1)
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body

    def lookups_until(self, marker: str) -> list[str]:
        """The names looked up, in order, up to a lookup of `marker` (not included)."""
        names: list[str] = []
        while True:
            message = _read_one(Unmarshaller(sock=self.raw.sock, negotiate_unix_fd=True))
            if message.message_type is MessageType.METHOD_CALL and message.member == LOOKUP:
                if message.body[0] == marker:
                    return names
                names.append(message.body[0])

    def close(self) -> None:
        self.raw.close()


@pytest.fixture(params=["dbus-daemon", "dbus-broker"])
def bus(request: pytest.FixtureRequest) -> Iterator[PrivateBus]:
    """Each bus implementation: both answer with a pidfd in their newer versions."""
    if "implementation" not in inspect.signature(PrivateBus).parameters:
        if request.param != "dbus-daemon":
            pytest.skip("this PrivateBus runs dbus-daemon only")
        extra: dict[str, str] = {}
    else:
        extra = {"implementation": request.param}
    if shutil.which(request.param) is None:
        pytest.skip(f"{request.param} is not installed")
    directory = Path(tempfile.mkdtemp(prefix="lud-bus-"))
    with PrivateBus(directory, **extra) as private_bus:
        yield private_bus
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def monitor(bus: PrivateBus, daemon: DaemonProcess) -> Iterator[Monitor]:
    if os.geteuid() != 0:
        pytest.skip("connections of other uids need root")
    watching = Monitor(bus)
    yield watching
    watching.close()


async def test_one_lookup_per_connection_however_many_calls_wait_for_it(
    bus: PrivateBus, daemon: DaemonProcess, monitor: Monitor, client: Client
) -> None:
    await client.list_sessions()
    baseline = open_fds(daemon.pid)
    flooders = [RawClient.connect_as(NOBODY, bus) for _ in range(3)]
    try:
        for flooder in flooders:  # all sent before any is read: one cold connection each
            for _ in range(CALLS):
                flooder.send(MANAGER_PATH, MANAGER_INTERFACE, "ListSessions")
        for flooder in flooders:
            assert {outcome(r) for r in flooder.replies(CALLS)} == {"ok"}
        for flooder in flooders:  # later calls: the answer is remembered
            flooder.send(MANAGER_PATH, MANAGER_INTERFACE, "ListSessions")
            assert outcome(flooder.replies(1)[0]) == "ok"
        names = [f.unique_name for f in flooders]
    finally:
        for flooder in flooders:
            flooder.close()
    # The test's own lookup of a name the daemon never asks about marks the end: the
    # monitor has seen every lookup made before it.
    with contextlib.suppress(LookupError):  # whatever the answer, the call was seen
        await driver.call(client.bus, LOOKUP, "s", MARKER)
    looked_up = monitor.lookups_until(MARKER)
    assert sorted(n for n in looked_up if n in names) == sorted(names)
    await client.list_sessions()
    assert open_fds(daemon.pid) == baseline
