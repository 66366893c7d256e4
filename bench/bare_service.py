"""The baseline of the PreserveFd benchmark: a bare dbus-fast method taking and returning an fd.

Run as `python bench/bare_service.py ADDRESS`; prints "ready" once it owns its bus name.
"""

import asyncio
import os
import sys
from typing import Any

from dbus_fast import Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusUnixFd
from dbus_fast.service import ServiceInterface, dbus_method

NAME = "org.liveupdate1.BenchBare"
PATH = "/org/liveupdate1/BenchBare"


class ClosingBus(MessageBus):
    """Closes the fds of each reply once it is written (dbus-fast never does)."""

    def send(self, msg: Message) -> asyncio.Future[Any]:  # type: ignore[override]
        future: asyncio.Future[Any] = super().send(msg)
        if msg.unix_fds and msg.message_type is MessageType.METHOD_RETURN:
            fds = list(msg.unix_fds)
            future.add_done_callback(lambda _: close_all(fds))
        return future


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Bare(ServiceInterface):
    def __init__(self) -> None:
        super().__init__(NAME)

    @dbus_method(name="Echo")
    async def echo(self, fd: DBusUnixFd) -> DBusUnixFd:
        return fd


async def serve(address: str) -> None:
    bus = await ClosingBus(bus_address=address, negotiate_unix_fd=True).connect()
    bus.export(PATH, Bare())
    if await bus.request_name(NAME, NameFlag.DO_NOT_QUEUE) is not RequestNameReply.PRIMARY_OWNER:
        raise SystemExit(f"{NAME} is taken")
    print("ready", flush=True)
    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
