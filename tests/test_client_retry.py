"""The client library sends a call the bus refused with LimitsExceeded again, a few
times, after a growing wait: a full queue of the bus is a moment, not an answer.

The bus here allows each connection 2 calls awaiting replies (max_replies_per_connection;
the system bus's is 128). A second connection of the test answers calls only when told
(`Holder`): two calls to it awaiting their replies fill the client's share, so its next
call is refused by the bus itself, for certain."""

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature as Sig
from dbus_fast.service import ServiceInterface, dbus_method

from liveupdated import privatebus
from liveupdated.bus.address import connect
from liveupdated.client import LIMITS_EXCEEDED, BusError, Client
from liveupdated.privatebus import PrivateBus

HOLDER_PATH = "/test/holder"
HOLDER_INTERFACE = "test.Holder"


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    limit = '<limit name="max_replies_per_connection">2</limit>'
    monkeypatch.setattr(privatebus, "CONFIG", privatebus.CONFIG.replace("<auth>", limit + "<auth>"))
    directory = Path(tempfile.mkdtemp(prefix="lud-bus-"))
    with PrivateBus(directory) as private_bus:
        yield private_bus
    shutil.rmtree(directory, ignore_errors=True)


class Holder(ServiceInterface):
    """Hold(): answered once `release` is set."""

    def __init__(self) -> None:
        super().__init__(HOLDER_INTERFACE)
        self.release = asyncio.Event()

    @dbus_method(name="Hold")
    async def hold(self) -> Annotated[str, Sig("s")]:
        await self.release.wait()
        return "released"


@pytest.fixture
async def holder(bus: PrivateBus) -> AsyncIterator[tuple[MessageBus, Holder]]:
    connection = await connect(bus.address)
    service = Holder()
    connection.export(HOLDER_PATH, service)
    yield connection, service
    connection.disconnect()


def hold(client: Client, holder: MessageBus) -> "asyncio.Future[Message | None]":
    return asyncio.ensure_future(client.bus.call(Message(
        destination=holder.unique_name, path=HOLDER_PATH, interface=HOLDER_INTERFACE,
        member="Hold")))


def refusals(client: Client) -> asyncio.Event:
    """Set when the bus refuses one of the client's calls with LimitsExceeded."""
    refused = asyncio.Event()

    def watch(msg: Message) -> None:
        if msg.message_type is MessageType.ERROR and msg.error_name == LIMITS_EXCEEDED:
            refused.set()

    client.bus.add_message_handler(watch)
    return refused


async def test_a_call_the_bus_refused_is_sent_again(
    client: Client, holder: tuple[MessageBus, Holder]
) -> None:
    connection, service = holder
    refused = refusals(client)
    held = [hold(client, connection) for _ in range(2)]  # the client's whole share
    listing = asyncio.ensure_future(client.list_sessions())
    async with asyncio.timeout(10):
        await refused.wait()  # the first try: refused by the bus, not by the daemon
    assert not listing.done()
    service.release.set()
    async with asyncio.timeout(10):
        assert await listing == []
        assert [r.body for r in await asyncio.gather(*held) if r] == [["released"]] * 2


async def test_a_limit_that_stays_is_an_error_in_the_end(
    client: Client, holder: tuple[MessageBus, Holder]
) -> None:
    """Bounded: while the share stays full, the call fails with the bus's error."""
    connection, service = holder
    held = [hold(client, connection) for _ in range(2)]
    started = asyncio.get_running_loop().time()
    state = asyncio.ensure_future(client.state())  # sent after the holds, as tasks start
    with pytest.raises(BusError, match=LIMITS_EXCEEDED):
        await state
    assert 4 < asyncio.get_running_loop().time() - started < 15
    service.release.set()
    await asyncio.gather(*held)
