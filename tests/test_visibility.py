"""Session objects are visible to their owner and root only, over a real bus: uid 65534
against root's sessions, by introspection and the Properties interface, with the
caller's identity not yet known to the daemon (first call) and known (later calls)."""

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant

from liveupdated.bus import MANAGER_INTERFACE, SESSION_INTERFACE
from liveupdated.client import Client
from liveupdated.core.errors import AccessDenied
from liveupdated.core.names import MANAGER_PATH, SESSION_PATH_PREFIX, session_path
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.other_uid import OtherUid
from tests.test_bus_limits import NOBODY, RawClient

ACCESS_DENIED = "org.liveupdate1.Error.AccessDenied"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"
SESSIONS = SESSION_PATH_PREFIX.rstrip("/")


def label(name: str) -> str:
    return session_path(name).rsplit("/", 1)[1]


class Caller:
    """Synchronous calls over a RawClient: the answer's body, or ("error", name, text)."""

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw

    def call(self, path: str, interface: str, member: str, signature: str = "",
             body: list[Any] | None = None) -> Any:
        self.raw.send(path, interface, member, signature, body or [])
        (reply,) = self.raw.replies(1)
        return answer(reply)

    def introspect(self, path: str) -> Any:
        return self.call(path, INTROSPECTABLE, "Introspect")

    def children(self, path: str) -> list[str]:
        xml = self.introspect(path)
        assert isinstance(xml, str), xml
        return sorted(node.get("name", "") for node in ET.fromstring(xml).findall("node"))


def answer(reply: Message) -> Any:
    if reply.message_type is MessageType.ERROR:
        return ("error", reply.error_name, reply.body[0] if reply.body else "")
    return reply.body[0] if len(reply.body) == 1 else reply.body


@pytest.fixture
def nobody(bus: PrivateBus, daemon: DaemonProcess) -> Iterator[Caller]:
    raw = RawClient.connect_as(NOBODY, bus)
    yield Caller(raw)
    raw.close()


@pytest.fixture
def root(bus: PrivateBus, daemon: DaemonProcess) -> Iterator[Caller]:
    raw = RawClient.connect_as(0, bus)
    yield Caller(raw)
    raw.close()


def create(caller: Caller, name: str) -> None:
    assert caller.call(MANAGER_PATH, MANAGER_INTERFACE, "CreateSession", "s", [name]) == (
        session_path(name)
    )


def denied(path: str) -> tuple[str, str, str]:
    return ("error", ACCESS_DENIED, f"only the owner of a session or root may inspect {path}")


async def test_introspection_lists_only_the_callers_sessions(
    client: Client, nobody: Caller, root: Caller
) -> None:
    await client.create_session("root-vm")
    # Cold: nobody's first call waits for its credentials; then they are known.
    for _ in range(2):
        assert nobody.children(SESSIONS) == []
        assert nobody.children("/org/liveupdate1") == []  # not even that sessions exist
        assert nobody.children("/org") == ["liveupdate1"]
        assert nobody.children("/") == ["org"]
    assert root.children(SESSIONS) == [label("root-vm")]
    assert root.children("/org/liveupdate1") == ["session"]

    create(nobody, "65534-vm")
    assert nobody.children(SESSIONS) == [label("65534-vm")]
    assert nobody.children("/org/liveupdate1") == ["session"]
    assert root.children(SESSIONS) == sorted([label("65534-vm"), label("root-vm")])
    assert MANAGER_INTERFACE in nobody.introspect("/org/liveupdate1")


async def test_a_session_is_introspected_by_its_owner_and_root_only(
    client: Client, nobody: Caller, root: Caller
) -> None:
    await client.create_session("root-vm")
    theirs, missing = session_path("root-vm"), session_path("no-such-vm")
    assert nobody.introspect(theirs) == denied(theirs)  # cold
    assert nobody.introspect(missing) == denied(missing)  # alike: existence does not show
    assert nobody.introspect(theirs + "/below") == denied(theirs + "/below")
    assert nobody.introspect(theirs) == denied(theirs)  # warm
    create(nobody, "65534-vm")
    assert SESSION_INTERFACE in nobody.introspect(session_path("65534-vm"))
    assert SESSION_INTERFACE in root.introspect(session_path("65534-vm"))
    assert SESSION_INTERFACE in root.introspect(theirs)


async def test_session_properties_are_for_its_owner_and_root_only(
    bus: PrivateBus, client: Client, nobody: Caller, root: Caller
) -> None:
    await client.create_session("root-vm")
    for path in (session_path("root-vm"), session_path("no-such-vm")):
        assert nobody.call(path, PROPERTIES, "Get", "ss", [SESSION_INTERFACE, "Owner"]) == (
            denied(path)
        )
        assert nobody.call(path, PROPERTIES, "GetAll", "s", [SESSION_INTERFACE]) == denied(path)
        assert nobody.call(path, PROPERTIES, "Set", "ssv",
                           [SESSION_INTERFACE, "Name", Variant("s", "x")]) == denied(path)
    async with OtherUid(bus.address) as other:  # the client library's way, cold
        with pytest.raises(AccessDenied):
            await other.call("session_properties", session="root-vm")
        await other.call("create_session", name=f"{NOBODY}-other-vm")
        mine = await other.call("session_properties", session=f"{NOBODY}-other-vm")
        assert mine["Owner"] == NOBODY
    create(nobody, "65534-vm")
    mine = session_path("65534-vm")
    assert nobody.call(mine, PROPERTIES, "Get", "ss", [SESSION_INTERFACE, "Owner"]) == (
        Variant("u", NOBODY)
    )
    assert nobody.call(mine, PROPERTIES, "Set", "ssv",
                       [SESSION_INTERFACE, "Name", Variant("s", "x")])[1] != ACCESS_DENIED
    assert root.call(mine, PROPERTIES, "GetAll", "s", [SESSION_INTERFACE])["Name"] == (
        Variant("s", "65534-vm")
    )


async def test_get_managed_objects_is_for_root_only(
    client: Client, nobody: Caller, root: Caller
) -> None:
    await client.create_session("root-vm")
    for path in ("/", MANAGER_PATH):
        error = nobody.call(path, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        assert error[:2] == ("error", ACCESS_DENIED)
    objects = root.call("/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    assert session_path("root-vm") in objects
