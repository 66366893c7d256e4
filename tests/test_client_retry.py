"""The client library sends a call the bus refused with LimitsExceeded again, a few
times, after a growing wait: a full queue of the bus is a moment, not an answer.

The bus here allows each connection 2 calls awaiting replies (max_replies_per_connection;
the system bus's is 128), so a client with 6 or 12 calls at once meets the limit for real."""

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType

from liveupdated import privatebus
from liveupdated.bus import BUS_NAME, MANAGER_INTERFACE
from liveupdated.client import LIMITS_EXCEEDED, Client
from liveupdated.core.names import MANAGER_PATH
from liveupdated.privatebus import PrivateBus

CALLS = 6


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    limit = '<limit name="max_replies_per_connection">2</limit>'
    monkeypatch.setattr(privatebus, "CONFIG", privatebus.CONFIG.replace("<auth>", limit + "<auth>"))
    directory = Path(tempfile.mkdtemp(prefix="lud-bus-"))
    with PrivateBus(directory) as private_bus:
        yield private_bus
    shutil.rmtree(directory, ignore_errors=True)


async def test_the_bus_refuses_calls_over_its_limit(bus: PrivateBus, client: Client) -> None:
    """The premise: without the retry, some of the same calls fail."""
    calls = [client.bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                     interface=MANAGER_INTERFACE, member="ListSessions"))
             for _ in range(CALLS)]
    replies = await asyncio.gather(*calls)
    refused = [r for r in replies if r is not None and r.message_type is MessageType.ERROR]
    assert refused and {r.error_name for r in refused} == {LIMITS_EXCEEDED}


async def test_calls_refused_with_limits_exceeded_are_retried(
    bus: PrivateBus, client: Client
) -> None:
    session = await client.create_session("vm")
    sessions = asyncio.gather(*(client.list_sessions() for _ in range(CALLS)))
    fds = asyncio.gather(*(session.list_fds() for _ in range(CALLS)))
    listed, held = await asyncio.gather(sessions, fds)
    assert [len(a) for a in listed] == [1] * CALLS and held == [[]] * CALLS
