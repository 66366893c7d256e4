"""The systemd edge: sd_notify messages, the fd store, inherited fds and the boot id.

READY=1, STOPPING=1, WATCHDOG=1 and EXTEND_TIMEOUT_USEC= go through sdnotify; fd store
messages (FDSTORE=1 with SCM_RIGHTS, which sdnotify cannot send, and FDSTOREREMOVE=1) and
STATUS= go in order over a socket of their own to the same $NOTIFY_SOCKET, never blocking
the loop. Without $NOTIFY_SOCKET all is a no-op.
"""

import array
import asyncio
import contextlib
import os
import select
import socket
from collections import deque
from pathlib import Path

import sdnotify
import structlog

from liveupdated.durable import point

log = structlog.get_logger("liveupdated")

SD_LISTEN_FDS_START = 3
_STORE_DRAIN_TIMEOUT = 5.0  # seconds to hand the last messages over at exit


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """The kernel's boot id. In a container behind ProtectKernelTunables= it is the
    host's (the container's own is mounted over /proc/sys, which the sandbox remounts):
    recovery does not rest on it alone (see pid1_start)."""
    return Path(BOOT_ID_PATH).read_text().strip()


def pid1_start() -> int | None:
    """PID 1's start time (/proc/1/stat field 22, clock ticks after the kernel booted).
    It changes at every boot of a container (whose PID 1 is its own init), not at a
    restart of this daemon; None if it cannot be read."""
    try:
        stat = Path("/proc/1/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def fd_name(session: str, token: str) -> str:
    return f"{session}/{token}"


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(address)
        self._text = sdnotify.SystemdNotifier()
        self._store: socket.socket | None = None
        # Messages the service manager's notify queue had no room for yet (it holds
        # net.unix.max_dgram_qlen datagrams, 10 by default): each with a dup of its fd,
        # as the caller may close its own before the queue drains.
        self._queue: deque[tuple[bytes, int | None]] = deque()
        self._drained: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # BARRIER=1: how many fd store messages were sent, and how many of them the
        # service manager is known to have processed (it closes a barrier's fd after
        # every earlier message): an fd is acknowledged to a VMM only once it is stored.
        self._sent = 0
        self._confirmed = 0
        self._barrier: asyncio.Future[None] | None = None
        if address:
            if address.startswith("@"):
                address = "\0" + address[1:]
            self._store = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
            self._store.connect(address)

    def notify(self, *fields: str) -> None:
        if self.enabled:
            self._text.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """STATUS= follows every change, so it goes the fd store's way: in order, never
        blocking the loop on a full notify queue (READY=1 and the rest are rare)."""
        self._send(f"STATUS={status}".encode(), None)

    def store_fd(self, name: str, fd: int) -> None:
        point("fd store message")
        self._sent += 1
        self._send(f"FDSTORE=1\nFDNAME={name}".encode(), fd)

    def remove_fd(self, name: str) -> None:
        point("fd store message")
        self._sent += 1
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}".encode(), None)

    async def stored(self) -> None:
        """Until the service manager has processed every fd store message sent so far:
        handed over (the notify queue may be full), then confirmed by BARRIER=1, one
        barrier for every caller waiting at the time (a group commit's worth)."""
        if self._store is None:
            return
        target = self._sent
        while self._confirmed < target:
            if self._queue:
                if self._drained is None:
                    self._drained = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._drained)
                continue
            if self._barrier is None:
                self._barrier = self._start_barrier()
            await asyncio.shield(self._barrier)

    def _start_barrier(self) -> "asyncio.Future[None]":
        """BARRIER=1 with the write end of a pipe: the read end sees EOF once the manager
        has processed (and closed) it, after every message sent before it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        covers = self._sent
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._send(b"BARRIER=1", write_end)
        finally:
            os.close(write_end)

        def confirmed() -> None:
            try:
                if os.read(read_end, 1):
                    return  # nothing is ever written: not the end yet
            except BlockingIOError:
                return
            except OSError:
                pass
            loop.remove_reader(read_end)
            os.close(read_end)
            self._confirmed = max(self._confirmed, covers)
            self._barrier = None
            if not done.done():
                done.set_result(None)

        loop.add_reader(read_end, confirmed)
        return done

    def _send(self, message: bytes, fd: int | None) -> None:
        if self._store is None:
            return
        if not self._queue and self._try_send(message, fd):
            return
        try:
            held = None if fd is None else os.dup(fd)
        except OSError as exc:  # out of fds: the service goes on without the store
            log.warning("fd_store_failed", message=message.decode(), error=exc.strerror)
            return
        self._queue.append((message, held))
        if len(self._queue) == 1:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:  # outside the loop (exit paths): wait for room here
                self._drain_blocking()
                return
            self._loop.add_writer(self._store, self._drain)

    def _try_send(self, message: bytes, fd: int | None) -> bool:
        """False if the manager's queue is full; other errors are logged, as sd_notify
        would swallow them: the service goes on without the store."""
        assert self._store is not None
        fds = [] if fd is None else [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))
        ]
        try:
            self._store.sendmsg([message], fds)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("fd_store_failed", message=message.decode(), error=exc.strerror)
        return True

    def _drain(self) -> None:
        if not self._send_queued():
            return  # still full: stay armed for the next chance to write
        if self._loop is not None and self._store is not None:
            self._loop.remove_writer(self._store)
        self._emptied()

    def close(self) -> None:
        """Hand over what is still queued (waiting a little for room), then close."""
        if self._text.socket is not None:  # sdnotify's own (None: it found no socket)
            self._text.socket.close()
        if self._store is None:
            return
        if self._queue and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_writer(self._store)
        self._drain_blocking()
        self._store.close()
        self._store = None

    def _drain_blocking(self) -> None:
        assert self._store is not None
        while not self._send_queued():
            if not select.select([], [self._store], [], _STORE_DRAIN_TIMEOUT)[1]:
                log.warning("fd_store_messages_dropped", count=len(self._queue))
                for _, fd in self._queue:
                    if fd is not None:
                        os.close(fd)
                self._queue.clear()
        self._emptied()

    def _send_queued(self) -> bool:
        """Send queued messages while the manager takes them; is the queue empty now?"""
        while self._queue:
            message, fd = self._queue[0]
            if not self._try_send(message, fd):
                return False
            self._queue.popleft()
            if fd is not None:
                os.close(fd)
        return True

    def _emptied(self) -> None:
        if self._drained is not None and not self._drained.done():
            with contextlib.suppress(RuntimeError):  # its loop may be closed by now
                self._drained.set_result(None)
        self._drained = None

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC in seconds, when the watchdog is on for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6



def take_listen_fds() -> list[tuple[str, int]]:
    """(name, fd) of the fds systemd passed to this process (its fd store), once."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = int(os.environ.pop("LISTEN_FDS", "0") or 0)
    names = os.environ.pop("LISTEN_FDNAMES", "").split(":")
    if not pid or int(pid) != os.getpid():
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    names += ["unknown"] * (count - len(names))
    return list(zip(names, fds, strict=False))


# ---- PID 1 over D-Bus: what the fdstore backend asks of systemd itself ------------------

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
SYSTEMD_SERVICE = "org.freedesktop.systemd1.Service"
_PID1_TIMEOUT = 5.0  # seconds for a whole exchange with PID 1


class Pid1Error(RuntimeError):
    """The system bus or systemd did not answer, or answered with an error."""


def under_systemd() -> bool:
    """Started by systemd as a service (its environment says so)."""
    return bool(os.environ.get("INVOCATION_ID")) and Path("/run/systemd/system").is_dir()


def systemd_version(text: str) -> int:
    """The major version of systemd's Version property ("262.1-1", "252.38-1~deb12u1");
    0 if it cannot be read."""
    digits = ""
    for char in text.strip().lstrip("v"):
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else 0


def pid1(
    manager_props: tuple[str, ...] = (),
    unit_props: tuple[str, ...] = (),
    call: str = "",
    args: tuple[object, ...] = (),
    signature: str = "",
) -> dict[str, object]:
    """One exchange with systemd on the system bus, from any thread (it runs its own loop
    in a helper thread): properties of the Manager, properties of this process's own
    service unit (a property systemd does not know is left out), then a Manager method
    (its reply's first value under the method's name).
    Pid1Error if the bus or a call fails (a property that is missing is no error)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pid1") as helper:
        future = helper.submit(
            asyncio.run, _pid1(manager_props, unit_props, call, args, signature)
        )
        try:
            return future.result(timeout=_PID1_TIMEOUT + 1)
        except Pid1Error:
            raise
        except Exception as exc:
            raise Pid1Error(f"systemd on the system bus: {exc or type(exc).__name__}") from exc


async def _pid1(
    manager_props: tuple[str, ...],
    unit_props: tuple[str, ...],
    call: str,
    args: tuple[object, ...],
    signature: str,
) -> dict[str, object]:
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    async def request(path: str, interface: str, member: str, sig: str,
                      body: list[object]) -> Message:
        reply = await bus.call(Message(destination=SYSTEMD_BUS_NAME, path=path,
                                       interface=interface, member=member, signature=sig,
                                       body=body))
        assert reply is not None
        return reply

    async def get(path: str, interface: str, name: str) -> object | None:
        reply = await request(path, "org.freedesktop.DBus.Properties", "Get", "ss",
                              [interface, name])
        if reply.message_type is MessageType.ERROR:
            return None  # e.g. a property this systemd does not have
        value: object = reply.body[0].value
        return value

    async def exchange() -> dict[str, object]:
        found: dict[str, object] = {}
        for name in manager_props:
            value = await get(SYSTEMD_PATH, SYSTEMD_MANAGER, name)
            if value is not None:
                found[name] = value
        if unit_props:
            unit = await request(SYSTEMD_PATH, SYSTEMD_MANAGER, "GetUnitByPID", "u",
                                 [os.getpid()])
            if unit.message_type is MessageType.ERROR:
                raise Pid1Error(f"GetUnitByPID: {unit.error_name}: {unit.body}")
            for name in unit_props:
                value = await get(unit.body[0], SYSTEMD_SERVICE, name)
                if value is not None:
                    found[name] = value
        if call:
            reply = await request(SYSTEMD_PATH, SYSTEMD_MANAGER, call, signature, list(args))
            if reply.message_type is MessageType.ERROR:
                raise Pid1Error(f"{call}: {reply.error_name}: {reply.body}")
            found[call] = reply.body[0] if reply.body else None  # e.g. ListJobs' list
        return found

    try:
        bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(),
                                     _PID1_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        raise Pid1Error(f"no system bus: {exc or type(exc).__name__}") from exc
    try:
        return await asyncio.wait_for(exchange(), _PID1_TIMEOUT)
    finally:
        bus.disconnect()
