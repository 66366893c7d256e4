"""The daemon's bus connection: owns every fd that crosses it.

dbus-fast never closes an fd it receives or sends. Here, each received fd is made
close-on-exec and closed at once unless it is an fd argument of a well-formed PreserveFd
or PreserveFds; each fd the daemon sends in a reply is a dup that is closed once written.

It bounds the calls each connection has in flight (MAX_CALLS_IN_FLIGHT): a call is in
flight from its arrival until its answer is written to the socket, so what one client
can make the daemon hold is bounded. A call over the bound is answered QuotaExceeded at
once, and the fds it carried are closed.

Its writes never give up on a full socket: dbus-fast's writer treats EAGAIN from send()
as a lost connection, so one burst of large replies (a client pipelining ListSessions)
disconnected the daemon. Here a write that would block waits for the socket instead.
"""

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter

from liveupdated.bus import ERROR_PREFIX, SESSION_INTERFACE
from liveupdated.bus.callers import CURRENT_MESSAGE

# The bound on one connection's calls in flight: the system bus's own bound on a
# connection's calls awaiting replies (max_replies_per_connection, 128 by default), so
# no client the system bus lets through is refused by the daemon, while on buses that
# allow more (session.conf: 50000) one client still cannot make the daemon hold more
# than 128 answers (ListSessions at 744 sessions is ~130 KB: ~16 MB at worst). Clients
# keep far fewer in flight: a VMM waits for each PreserveFd(s) answer, the bench keeps
# 32, and preserving a whole session at once (128 fds, one call each) fits.
MAX_CALLS_IN_FLIGHT = 128
QUOTA_EXCEEDED = ERROR_PREFIX + "QuotaExceeded"
PRESERVE_SIGNATURE = "shas"
PRESERVE_ALL_SIGNATURE = "a(shas)"
_BAD_FD = {
    "PreserveFd": "the fd argument names no passed fd",
    "PreserveFds": "each fd argument must name a passed fd of its own (to preserve one fd "
    "under two tokens, pass it twice)",
}


class _PatientWriter(_MessageWriter):
    """dbus-fast's writer, except that a socket that cannot take more now (EAGAIN) is
    waited for: the rest of the buffer, and its fds if not sent yet, go out when the
    socket is writable again. Any other error still ends the connection."""

    def write_callback(self, remove_writer: bool = True) -> None:
        sock, fd = self.sock, self.fd
        if sock is None or fd is None:
            return
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(fd)
                        return
                    buf, unix_fds, fut = self.messages.popleft()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                if self.unix_fds and self.negotiate_unix_fd:
                    ancdata = [
                        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))
                    ]
                    # On EAGAIN nothing was sent: the fds stay with the buffer.
                    self.offset += sock.sendmsg([self.buf[self.offset :]], ancdata)
                    self.unix_fds = None
                else:
                    self.offset += sock.send(self.buf[self.offset :])
                if self.offset < len(self.buf):
                    return  # the writer stays (or is) registered: wait for writable
                self.buf = None
                if self.fut is not None and not self.fut.done():
                    self.fut.set_result(None)
        except (BlockingIOError, InterruptedError):
            # Called from the loop, the writer is registered; called from
            # schedule_write, it registers it because self.buf is set.
            return
        except Exception as exc:
            if self.fut is not None and not self.fut.done():
                if self.bus._user_disconnect:
                    self.fut.set_result(None)
                else:
                    self.fut.set_exception(exc)
            self.bus._finalize(exc)


class FdOwningBus(MessageBus):
    """A MessageBus that closes the fds of every reply once the reply is on the wire,
    can tell when the reply to a given call has been written and waits for its
    socket when it is full."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reply_watchers: dict[int, Callable[[], None]] = {}
        self._in_flight: dict[str, set[int]] = {}  # sender -> serials of its calls

    def call_arrived(self, sender: str, serial: int, limit: int) -> bool:
        """Count a call in flight; False (and not counted) when `sender` has `limit`."""
        calls = self._in_flight.setdefault(sender, set())
        if serial in calls:
            return True
        if len(calls) >= limit:
            return False
        calls.add(serial)
        return True

    def sender_left(self, sender: str) -> None:
        self._in_flight.pop(sender, None)

    async def connect(self) -> "FdOwningBus":
        await super().connect()
        writer = self._writer
        assert writer is not None and not writer.messages and writer.buf is None
        writer.__class__ = _PatientWriter  # the same writer, state and all
        return self

    def when_replied(self, serial: int, callback: Callable[[], None]) -> None:
        self._reply_watchers[serial] = callback

    def send(self, msg: Message) -> asyncio.Future[Any]:  # type: ignore[override]
        future: asyncio.Future[Any] = super().send(msg)
        if msg.unix_fds and msg.message_type is MessageType.METHOD_RETURN:
            fds = list(msg.unix_fds)
            future.add_done_callback(lambda _: _close_all(fds))
        calls = self._in_flight.get(msg.destination) if msg.destination else None
        if calls is not None and msg.reply_serial in calls:
            serial = msg.reply_serial
            future.add_done_callback(lambda _: calls.discard(serial))
        watcher = self._reply_watchers.pop(msg.reply_serial, None) if msg.reply_serial else None
        if watcher is not None:
            future.add_done_callback(lambda _: watcher())
        return future


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def limit_calls(
    bus: FdOwningBus, limit: int = MAX_CALLS_IN_FLIGHT
) -> Callable[[Message], Message | bool]:
    """A message handler, the first to run: counts each call expecting an answer against
    its sender's bound, refuses it (closing its fds) over the bound, and forgets the
    count of a sender that left the bus."""
    text = f"too many calls in flight on this connection ({limit}); wait for replies"

    def handle(msg: Message) -> Message | bool:
        if msg.message_type is MessageType.SIGNAL:
            if (
                msg.member == "NameOwnerChanged"
                and msg.sender == "org.freedesktop.DBus"
                and msg.body[0].startswith(":")
                and not msg.body[2]
            ):
                bus.sender_left(msg.body[0])
            return False
        if (
            msg.message_type is not MessageType.METHOD_CALL
            or msg.flags & MessageFlag.NO_REPLY_EXPECTED
            or not msg.sender
            or bus.call_arrived(msg.sender, msg.serial, limit)
        ):
            return False
        _close_all(msg.unix_fds)
        return Message.new_error(msg, QUOTA_EXCEEDED, text)

    return handle


def fd_guard(
    is_session_path: Callable[[str], bool], take_preserve_fd: Callable[[Message, int], bool]
) -> Callable[[Message], Message | bool]:
    """A message handler that runs before dispatch: records the current message and
    closes every received fd that no method will take ownership of. A well-formed
    PreserveFd is offered to `take_preserve_fd` (with the index of its fd) first; when
    that takes it, it is handled, else dispatched."""

    def handle(msg: Message) -> Message | bool:
        CURRENT_MESSAGE.set(msg)
        fds = msg.unix_fds
        for fd in fds:
            os.set_inheritable(fd, False)
        member = _preserve_call(msg, is_session_path)
        if member is None:
            _close_all(fds)
            return False
        keep = _owned_indices(msg, member)
        _close_all([fd for i, fd in enumerate(fds) if keep is None or i not in keep])
        if keep is None:  # also with no fds at all: an index must never reach a method
            if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
                return True
            return Message.new_error(msg, ERROR_PREFIX + "InvalidArgument", _BAD_FD[member])
        if member == "PreserveFd":
            return take_preserve_fd(msg, next(iter(keep)))
        if member == "PreserveFds":
            # dbus-fast unmarshals structs as tuples, then fails to put the fds into them
            # (its dispatch raises TypeError and the fds would stay open): lists it can fill.
            entries = msg.body[0]
            entries[:] = [list(entry) for entry in entries]
        return False

    return handle


def _preserve_member(msg: Message) -> str | None:
    """PreserveFd or PreserveFds, when msg calls one with its signature."""
    if msg.interface not in (SESSION_INTERFACE, None):
        return None
    if msg.member == "PreserveFd" and msg.signature == PRESERVE_SIGNATURE:
        return "PreserveFd"
    if msg.member == "PreserveFds" and msg.signature == PRESERVE_ALL_SIGNATURE:
        return "PreserveFds"
    return None


def _preserve_call(msg: Message, is_session_path: Callable[[str], bool]) -> str | None:
    """PreserveFd or PreserveFds, when msg is a call of one on a session object."""
    path = msg.path
    if msg.message_type is not MessageType.METHOD_CALL or path is None:
        return None
    return _preserve_member(msg) if is_session_path(path) else None


def _owned_indices(msg: Message, member: str) -> frozenset[int] | None:
    """Indices of the fds a PreserveFd(s) call will own, or None if the call must be
    rejected: each fd argument must be the index of a passed fd, no two the same."""
    body = msg.body
    indices = [body[1]] if member == "PreserveFd" else [entry[1] for entry in body[0]]
    if not all(isinstance(i, int) and 0 <= i < len(msg.unix_fds) for i in indices):
        return None
    owned = frozenset(indices)
    return owned if len(owned) == len(indices) else None
