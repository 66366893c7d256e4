"""The baseline of the PreserveFd benchmark: a bare dbus-fast method taking and returning an fd
(Echo), and one taking and returning several (EchoAll), beside PreserveFds.

Run as `python bench/bare_service.py ADDRESS [raw]`; prints "ready" once it owns its bus
name. `raw` answers from a message handler, without dbus-fast's ServiceInterface dispatch
(as liveupdated answers PreserveFd), under the name RAW_NAME: the floor of any service
written with dbus-fast, reported beside the baseline.
"""

import asyncio
import os
import sys
from typing import Annotated, Any

from dbus_fast import Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusUnixFd
from dbus_fast.service import ServiceInterface, dbus_method

FdArray = Annotated[list[int], DBusSignature("ah")]
NAME = "org.liveupdate1.BenchBare"
RAW_NAME = "org.liveupdate1.BenchBareRaw"
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

    @dbus_method(name="EchoAll")
    async def echo_all(self, fds: FdArray) -> FdArray:
        return fds


def echo_raw(msg: Message) -> Message | None:
    if msg.member != "Echo" or msg.signature != "h" or len(msg.unix_fds) != 1:
        return None
    return Message.new_method_return(msg, "h", [0], unix_fds=msg.unix_fds)


async def serve(address: str, raw: bool) -> None:
    bus = await ClosingBus(bus_address=address, negotiate_unix_fd=True).connect()
    if raw:
        bus.add_message_handler(echo_raw)
    else:
        bus.export(PATH, Bare())
    name = RAW_NAME if raw else NAME
    if await bus.request_name(name, NameFlag.DO_NOT_QUEUE) is not RequestNameReply.PRIMARY_OWNER:
        raise SystemExit(f"{name} is taken")
    print("ready", flush=True)
    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2:] == ["raw"]))
