"""A stand-in for polkitd on the tests' private bus: org.freedesktop.PolicyKit1's
CheckAuthorization answered from a table of (uid, action) it allows.

In the test process (as root) through the `Authority` interface; as another uid (the
impostor a misconfigured bus lets own the name) by `python -m tests.fake_polkit UID`
run as root with $LUD_BUS: it imports what it needs, drops to UID, takes the name,
allows everything, prints "ready" and serves until stdin closes.
"""

import asyncio
import os
import sys
from typing import Annotated, Any

from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature as Sig
from dbus_fast.service import ServiceInterface, dbus_method

NAME = "org.freedesktop.PolicyKit1"
PATH = "/org/freedesktop/PolicyKit1/Authority"


class Authority(ServiceInterface):
    """CheckAuthorization: yes for the (uid, action) pairs in `allowed` (None: all)."""

    def __init__(self, bus: MessageBus, allowed: set[tuple[int, str]] | None) -> None:
        super().__init__("org.freedesktop.PolicyKit1.Authority")
        self.bus = bus
        self.allowed = allowed
        self.asked: list[tuple[str, str, int]] = []
        self.destinations: list[str | None] = []  # of each CheckAuthorization call

    def saw(self, msg: Message) -> None:
        if msg.member == "CheckAuthorization":
            self.destinations.append(msg.destination)

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
        uid = await uid_of(self.bus, fields["name"].value)  # as polkitd finds it
        self.asked.append((kind, action, flags))
        return [self.allowed is None or (uid, action) in self.allowed, False, {}]


async def uid_of(bus: MessageBus, name: str) -> int:
    reply = await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="GetConnectionUnixUser", signature="s",
        body=[name],
    ))
    assert reply is not None
    return int(reply.body[0])


async def serve(address: str, allowed: set[tuple[int, str]] | None) -> tuple[MessageBus,
                                                                             Authority]:
    """A connection that owns org.freedesktop.PolicyKit1 and answers for it."""
    connection = await MessageBus(bus_address=address, bus_type=BusType.SESSION).connect()
    authority = Authority(connection, allowed)
    connection.add_message_handler(authority.saw)
    connection.export(PATH, authority)
    await connection.request_name(NAME)
    return connection, authority


async def _main(address: str) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    connection, _ = await serve(address, None)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await stdin.read()
    connection.disconnect()


if __name__ == "__main__":
    uid = int(sys.argv[1])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    asyncio.run(_main(os.environ["LUD_BUS"]))
