"""Helpers of the session-rule tests (tests/test_rules_*.py); it holds no tests itself, and
its name does not start with test_ so that pytest does not collect it as a test module.

The one daemon harness, `Host`, lives in tests/conftest.py; it is re-exported here.
"""

import asyncio
import contextlib
import pwd
import struct
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self

from dbus_fast import Message, MessageType

from liveupdated.bus import BUS_NAME, MANAGER_INTERFACE
from liveupdated.client import Client
from liveupdated.core.records import Record, decode_group
from liveupdated.journal import MAGIC
from tests.conftest import Host

__all__ = ["NOBODY", "OTHER_UID", "Host"]

NOBODY = 65534


def _third_uid() -> int:
    """A uid that is neither root nor nobody and has a passwd entry (dbus-daemon rejects
    connections from uids it cannot look up): `daemon` on every Debian, else any."""
    try:
        return pwd.getpwnam("daemon").pw_uid
    except KeyError:
        return next(p.pw_uid for p in pwd.getpwall() if p.pw_uid not in (0, NOBODY))


OTHER_UID = _third_uid()


def journal_frames(path: Path) -> list[tuple[int, int, list[Record]]]:
    """(offset of the payload, its length, its records) of every frame of a journal; a
    frame holds one record, or the records of one decision."""
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    frames = []
    offset = len(MAGIC)
    while offset < len(data):
        length, crc = struct.unpack_from("<II", data, offset)
        payload = data[offset + 8 : offset + 8 + length]
        assert zlib.crc32(payload) == crc
        frames.append((offset + 8, length, decode_group(payload)))
        offset += 8 + length
    return frames


def session_records(records: list[Record]) -> list[Record]:
    return [r for r in records if hasattr(r, "session")]


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
) -> None:
    """Poll a real condition until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def session_names(client: Client) -> list[str]:
    return [s.name for s in await client.list_sessions()]


async def has_owner(client: Client, name: str) -> bool:
    """Whether `name` is on the bus, asked of the bus itself."""
    reply = await client.bus.call(
        Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="NameHasOwner", signature="s",
            body=[name],
        )
    )
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN
    return bool(reply.body[0])


async def gone_from_bus(client: Client, name: str) -> None:
    """Wait until the bus has seen connection `name` leave (and so told liveupdated)."""

    async def gone() -> bool:
        return not await has_owner(client, name)

    await eventually(gone, f"{name} to leave the bus")


class Signals:
    """Records org.liveupdate1 signals (StateChanged, PropertiesChanged) seen by a client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: list[tuple[str, str, list[Any]]] = []
        self._changed = asyncio.Event()

    async def subscribe(self) -> Self:
        self.client.bus.add_message_handler(self._handle)
        for rule in (
            f"type='signal',sender='{BUS_NAME}',interface='{MANAGER_INTERFACE}',"
            "member='StateChanged'",
            f"type='signal',sender='{BUS_NAME}',"
            "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'",
        ):
            reply = await self.client.bus.call(
                Message(
                    destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                    body=[rule],
                )
            )
            assert reply is not None and reply.message_type is MessageType.METHOD_RETURN
        return self

    def _handle(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.member in (
            "StateChanged", "PropertiesChanged"
        ):
            self.seen.append((msg.member, msg.path or "", list(msg.body)))
            self._changed.set()
        return False

    def state_changes(self) -> list[tuple[str, str]]:
        return [(b[0], b[1]) for m, _, b in self.seen if m == "StateChanged"]

    def state_properties(self) -> list[str]:
        return [
            b[1]["State"].value for m, p, b in self.seen
            if m == "PropertiesChanged" and p == "/org/liveupdate1" and "State" in b[1]
        ]

    async def wait_for(
        self, predicate: Callable[["Signals"], bool], what: str, timeout: float = 10.0
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout}s; seen {self.seen}") from None


@contextlib.contextmanager
def unit_cgroup() -> Iterator[Path | None]:
    """A fresh cgroup named like a systemd scope, or None where none can be made."""
    name = f"lud-test-vmm-{uuid.uuid4().hex[:8]}.scope"
    for parent in (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"),
                   Path("/sys/fs/cgroup")):
        if not (parent / "cgroup.procs").exists():
            continue
        path = parent / name
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                path.rmdir()
        return
    yield None
