"""Session objects are visible to their owner and root only, over a real bus: uid 65534
against root's sessions, by introspection and the Properties interface, with the
caller's identity not yet known to the daemon (first call) and known (later calls)."""

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast._private.unmarshaller import Unmarshaller

from liveupdated.bus import MANAGER_INTERFACE, SESSION_INTERFACE
from liveupdated.bus.driver import DRIVER, DRIVER_PATH
from liveupdated.client import Client
from liveupdated.core.errors import AccessDenied
from liveupdated.core.names import MANAGER_PATH, SESSION_PATH_PREFIX, session_path
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import make_memfd
from tests.other_uid import OtherUid
from tests.test_bus_limits import NOBODY, RawClient, _read_one
from tests.test_spoofing import BUSES, private_bus

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


def messages_until_reply(raw: RawClient, serial: int) -> list[Message]:
    """Every message `raw` receives up to the reply to its call `serial` (fds closed)."""
    got: list[Message] = []
    while True:
        message = _read_one(Unmarshaller(sock=raw.sock, negotiate_unix_fd=True))
        for fd in message.unix_fds:
            os.close(fd)
        got.append(message)
        if message.reply_serial == serial:
            return got


def mentions(message: Message, words: list[str]) -> bool:
    text = repr((message.path, message.body))
    return any(word in text for word in words)


class TestOnEachBus:
    """On the tests' open bus, and on the system bus's own policy (dbus-daemon and
    dbus-broker), which lets any connection receive every broadcast."""

    @pytest.fixture(params=BUSES, ids=["-".join(b) for b in BUSES])
    def bus(self, request: pytest.FixtureRequest) -> Iterator[PrivateBus]:
        yield from private_bus(*request.param)

    async def test_no_signal_names_another_users_session(
        self, bus: PrivateBus, daemon: DaemonProcess
    ) -> None:
        """uid 65534 listens to everything it may receive (a match-all rule, no eavesdrop)
        while root creates a session, preserves into it and drops it: no signal names it.
        Its creator alone hears InterfacesAdded and InterfacesRemoved, with the properties.
        (The daemon's reply to a later call of 65534 comes after every signal it sent
        before: one connection, in order.)"""
        name = "secret-customer-acme-vm"
        listener = RawClient.connect_as(NOBODY, bus)
        heard: list[Message] = []
        try:
            listener.send(DRIVER_PATH, DRIVER, "AddMatch", "s", [""], destination=DRIVER)
            assert listener.replies(1)[0].message_type is MessageType.METHOD_RETURN
            async with await Client.connect(bus.address) as root:
                root.bus.add_message_handler(heard.append)  # None: others handle it too
                session = await root.create_session(name)
                fd = make_memfd(4096, b"customer data", name="acme-ram")
                await session.preserve_fd("ram", fd)
                os.close(fd)
                await root.prepare()  # broadcast: StateChanged, which 65534 does hear
                await root.cancel()
                await root.drop_session(name, "test")
                serial = listener.send(MANAGER_PATH, MANAGER_INTERFACE, "ListSessions")
                got = messages_until_reply(listener, serial)
        finally:
            listener.close()
        signals = [m for m in got if m.message_type is MessageType.SIGNAL]
        assert [m.body for m in signals if m.member == "StateChanged"] == [
            ["normal", "prepared"], ["prepared", "normal"]]
        words = [name, label(name), "acme"]
        assert [(m.member, m.path) for m in signals if mentions(m, words)] == []

        object_manager = [(m.member, m.body) for m in heard
                          if m.interface == "org.freedesktop.DBus.ObjectManager"]
        path = session_path(name)
        assert [(member, body[0]) for member, body in object_manager] == [
            ("InterfacesAdded", path), ("InterfacesRemoved", path)]
        added = object_manager[0][1][1][SESSION_INTERFACE]
        assert (added["Name"].value, added["Owner"].value, added["FdCount"].value) == (name, 0, 0)
        assert object_manager[1][1][1] == [SESSION_INTERFACE]
