"""Calls to the bus itself (org.freedesktop.DBus): who a connection is, whether a name
is on the bus, match rules. One place, so that no edge builds these messages by hand."""

from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

DRIVER = "org.freedesktop.DBus"
DRIVER_PATH = "/org/freedesktop/DBus"


async def call(bus: MessageBus, member: str, signature: str = "", *body: Any) -> list[Any]:
    """The reply's body; an error reply raises LookupError naming it."""
    reply = await bus.call(
        Message(destination=DRIVER, path=DRIVER_PATH, interface=DRIVER, member=member,
                signature=signature, body=list(body))
    )
    if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
        name = reply.error_name if reply is not None else "no reply"
        raise LookupError(f"{DRIVER}.{member}: {name}")
    return list(reply.body)


async def credentials(bus: MessageBus, name: str) -> dict[str, Any]:
    """GetConnectionCredentials: UnixUserID, ProcessID, ... as plain values."""
    (creds,) = await call(bus, "GetConnectionCredentials", "s", name)
    return {key: variant.value for key, variant in creds.items()}


async def has_owner(bus: MessageBus, name: str) -> bool:
    (owned,) = await call(bus, "NameHasOwner", "s", name)
    return bool(owned)


async def add_match(bus: MessageBus, rule: str) -> None:
    await call(bus, "AddMatch", "s", rule)
