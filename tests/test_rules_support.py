"""The harness of the session-rule tests (tests/test_rules_*.py); it holds no tests itself.

A `Host` is one machine under test: the test bus, a state directory, liveupdated
processes that restart (same fd store) or reboot (a new boot: a fresh fd store), and the
leftovers a test inspects afterwards: journal, handover area, the daemon's open fds.
"""

import asyncio
import contextlib
import os
import pwd
import struct
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from dbus_fast import Message, MessageType

from liveupdated.bus import BUS_NAME, MANAGER_INTERFACE
from liveupdated.client import Client
from liveupdated.core.records import Record, decode_group
from liveupdated.journal import MAGIC, decode
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess, Notifications

NOBODY = 65534


def _third_uid() -> int:
    """A uid that is neither root nor nobody and has a passwd entry (dbus-daemon rejects
    connections from uids it cannot look up): `daemon` on every Debian, else any."""
    try:
        return pwd.getpwnam("daemon").pw_uid
    except KeyError:
        return next(p.pw_uid for p in pwd.getpwall() if p.pw_uid not in (0, NOBODY))


OTHER_UID = _third_uid()


class Host:
    """The test bus plus one liveupdated at a time, in one state directory."""

    def __init__(self, bus: PrivateBus, directory: Path) -> None:
        self.bus = bus
        self.state_dir = directory / "state"
        self._log = (directory / "daemon.log").open("ab")
        self.notifications = Notifications()  # systemd's fd store for this boot
        self.args: tuple[str, ...] = ()
        self.daemon: DaemonProcess | None = None

    @property
    def address(self) -> str:
        return self.bus.address

    @property
    def handover_dir(self) -> Path:
        return self.state_dir / "handover"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal"

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid

    async def start(self, *args: str) -> DaemonProcess:
        """Start liveupdated (simulated backend) and return once it sent READY=1."""
        self.args = args
        daemon = DaemonProcess(
            self.bus.address, self.state_dir, "--backend", "simulated", *args,
            log=self._log, notifications=self.notifications,
        )
        self.daemon = daemon
        await asyncio.to_thread(daemon.start)
        return daemon

    async def restart(self, *, crash: bool = False) -> DaemonProcess:
        """Stop (SIGTERM) or kill (SIGKILL) the daemon and start it again, same boot."""
        await self.stop(crash=crash)
        return await self.start(*self.args)

    async def reboot(
        self, client: Client, between: Callable[[], None] | None = None
    ) -> DaemonProcess:
        """Reboot() through `client`, wait for the old daemon to exit 0, boot a new one
        (after calling `between`, to play with what the old kernel left).

        A new boot starts with an empty fd store, as systemd does after a real kexec.
        """
        assert self.daemon is not None
        await client.reboot()
        status = await asyncio.to_thread(self.daemon.wait, 60)
        assert status == 0, f"the old daemon exited {status} after Reboot()"
        self.notifications.close()
        self.notifications = Notifications()
        if between is not None:
            between()
        return await self.start(*self.args)

    async def stop(self, *, crash: bool = False) -> None:
        """SIGTERM the daemon and wait for it, or SIGKILL it (a crash)."""
        assert self.daemon is not None
        await asyncio.to_thread(self.daemon.kill if crash else self.daemon.stop)

    def connect(self) -> Awaitable[Client]:
        return Client.connect(self.bus.address)

    async def open_fds(self, client: Client) -> int:
        """The daemon's open fds, after a round trip through `client`: a reply's fds are
        closed once it is written, so by the time the daemon answers the next call."""
        await client.state()
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def journal_records(self) -> list[Record]:
        """The journal as it is on disk now, read without touching it (daemon running)."""
        records, damages, _ = decode(self.journal_path.read_bytes())
        assert damages == [], f"the journal is damaged: {damages}"
        return records

    def handover_files(self) -> list[str]:
        """Every file left in the handover area, relative to it."""
        if not self.handover_dir.exists():
            return []
        return sorted(
            str(p.relative_to(self.handover_dir)) for p in self.handover_dir.rglob("*")
            if not p.is_dir()
        )

    def stored_fd_names(self) -> set[str]:
        with self.notifications.changed:
            return set(self.notifications.store)

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
        self.notifications.close()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


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
