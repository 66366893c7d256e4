"""Host commands delegated through polkit, as logind delegates reboot.

On the private bus a small stand-in answers org.freedesktop.PolicyKit1's
CheckAuthorization from a table of (uid, action) it allows; the nspawn suite asks the
real polkitd with a real rule. Without any authority on the bus, root only, as before.
"""

import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature as Sig
from dbus_fast.service import ServiceInterface, dbus_method

from liveupdated.bus.polkit import DROP_SESSION, MANAGE
from liveupdated.client import Client
from liveupdated.core.errors import AccessDenied
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import make_memfd
from tests.other_uid import OtherUid

NOBODY = 65534


class Authority(ServiceInterface):
    """CheckAuthorization: yes for the (uid, action) pairs in `allowed`."""

    def __init__(self, bus: MessageBus, allowed: set[tuple[int, str]]) -> None:
        super().__init__("org.freedesktop.PolicyKit1.Authority")
        self.bus = bus
        self.allowed = allowed
        self.asked: list[tuple[str, str, int]] = []

    @dbus_method(name="CheckAuthorization")
    async def check_authorization(
        self,
        subject: Annotated[list[Any], Sig("(sa{sv})")],
        action: Annotated[str, Sig("s")],
        details: Annotated[dict[str, str], Sig("a{ss}")],
        flags: Annotated[int, Sig("u")],
        cancellation: Annotated[str, Sig("s")],
    ) -> Annotated[list[Any], Sig("(bba{ss})")]:
        kind, fields = subject
        uid = await _uid_of(self.bus, fields["name"].value)  # as polkitd finds it
        self.asked.append((kind, action, flags))
        return [(uid, action) in self.allowed, False, {}]


async def _uid_of(bus: MessageBus, name: str) -> int:
    reply = await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="GetConnectionUnixUser", signature="s",
        body=[name],
    ))
    assert reply is not None
    return int(reply.body[0])


@pytest.fixture
async def authority(bus: PrivateBus) -> AsyncIterator[Authority]:
    connection = await MessageBus(bus_address=bus.address, bus_type=BusType.SESSION).connect()
    service = Authority(connection, {(NOBODY, MANAGE)})
    connection.export("/org/freedesktop/PolicyKit1/Authority", service)
    await connection.request_name("org.freedesktop.PolicyKit1")
    yield service
    connection.disconnect()


async def test_polkit_lets_a_user_drive_the_update_for_the_actions_it_allows(
    bus: PrivateBus, daemon: DaemonProcess, authority: Authority
) -> None:
    async with await Client.connect(bus.address) as root, OtherUid(bus.address) as nobody:
        session = await root.create_session("vm")
        fd = make_memfd(4096, b"ram")
        await session.preserve_fd("ram", fd)
        await nobody.call("prepare")
        assert await root.state() == "prepared"
        assert ("system-bus-name", MANAGE, 0) in authority.asked
        with pytest.raises(AccessDenied, match=r"org\.liveupdate1\.drop-session"):
            await nobody.call("drop_session", name="vm", reason="not allowed")
        assert ("system-bus-name", DROP_SESSION, 0) in authority.asked
        await nobody.call("cancel")
        # Delegation covers the host's commands only: a session stays its owner's.
        with pytest.raises(AccessDenied):
            await nobody.call("list_fds", session="vm")
        asked = len(authority.asked)
        await root.prepare()  # root is never asked about
        assert len(authority.asked) == asked
    os.close(fd)


async def test_without_polkit_host_commands_are_roots(
    bus: PrivateBus, daemon: DaemonProcess
) -> None:
    async with OtherUid(bus.address) as nobody:
        for command in ("prepare", "freeze", "cancel", "reboot", "finish"):
            with pytest.raises(AccessDenied, match="polkit"):
                await nobody.call(command)
        with pytest.raises(AccessDenied):
            await nobody.call("drop_session", name="vm", reason="")
