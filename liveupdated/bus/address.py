"""`--bus system|session|ADDRESS` to a connected dbus-fast MessageBus."""

from dbus_fast import BusType
from dbus_fast.aio import MessageBus


async def connect(spec: str, bus_class: type[MessageBus] = MessageBus) -> MessageBus:
    if spec == "system":
        bus = bus_class(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
    elif spec == "session":
        bus = bus_class(bus_type=BusType.SESSION, negotiate_unix_fd=True)
    else:
        bus = bus_class(bus_address=spec, negotiate_unix_fd=True)
    return await bus.connect()
