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

Flow control (docs/API.md): the bus charges the daemon's messages that it holds for a
client that does not read to the *daemon's* incoming limits (dbus-daemon stops reading
the daemon at 64 fds; dbus-broker disconnects it), so what the daemon has written to a
connection and the connection has not yet taken is bounded, per connection, per uid and
in total, well under those limits. Taken is known by a round trip: after a few replies
the daemon sends the connection org.freedesktop.DBus.Peer.Ping, which it answers only
after it has read everything before it. A connection past its share has its further
calls held, in order, unanswered until its Ping comes back; a held call's fds are kept
within its uid's budget of held fds and closed on arrival past it (that call is then
answered QuotaExceeded when its turn comes). Whatever happens, every fd a call passed
is kept by a session or closed.

Losing the bus is one line and an exit for a restart: calls waiting on the bus are
answered (to no one) with a D-Bus error instead of the reader's EOFError, so that no
handler takes it for an internal error, and nothing is written after the loss.
"""

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from dbus_fast import DBusError, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter

from liveupdated.bus import ERROR_PREFIX, SESSION_INTERFACE
from liveupdated.bus.callers import CURRENT_MESSAGE
from liveupdated.bus.errors import error_message

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
# Flow control. The system bus's limits on the daemon: dbus-daemon's
# max_incoming_unix_fds 64 and max_incoming_bytes 127 MiB; dbus-broker's 4,096 fds and
# 512 MiB per uid (shared with everything else of root's). What is written and not yet
# taken stays well under them: at most 48 fds (16 of them for admins alone) and 48 MiB.
REPLIES_PER_CONNECTION = 16  # calls admitted and not yet known taken, per connection
PING_AFTER = 6  # unconfirmed replies that make the daemon ask for a Ping
PING_AFTER_BYTES = 64 << 10
BYTES_PER_CONNECTION = 512 << 10
BYTES_PER_UID = 8 << 20
BYTES_OF_TENANTS = 32 << 20  # every non-admin uid together
FDS_PER_CONNECTION = 16  # RetrieveFds answers up to 16
FDS_PER_UID = 16
FDS_OF_TENANTS = 32
# ADMINS_SHARE_NO_BUDGET: root's connections (the host's own VMMs and tools) are bounded
# each alone, never together. A budget shared by all of them let the VMMs whose loops were
# busy (a VMM loading its guest reads nothing for a while) hold every other root VMM's
# RetrieveFd answers: 30 of 64 VMMs never got their fds back after a soft-reboot. What a
# busy but reading client has not yet read sits in its own socket, not in the bus's queue
# that counts against the daemon; the tenants' budget below is what keeps the bus's
# limits on the daemon out of reach of any local user.
HELD_FDS_PER_UID = 128  # fds of held calls kept, per non-admin uid (an admin: 128 a connection)
PING_RETRY = 1.0  # seconds before a Ping the bus failed (not the peer) is sent again
OWNER_CHECK_INTERVAL = 30.0  # seconds between checks that clients with sessions are there
DISCONNECTED = "org.freedesktop.DBus.Error.Disconnected"
PEER_GONE = frozenset({
    "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",  # dbus-daemon: it left without replying
})
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


    def schedule_write(
        self, msg: Message | None = None, future: asyncio.Future[Any] | None = None
    ) -> None:
        try:
            super().schedule_write(msg, future)
        except OSError:
            # The write just now lost the connection, and dbus-fast then registers
            # the closed socket with the loop: nothing more is written.
            if not self.bus._disconnected:
                raise

    def buffer_message(self, msg: Message, future: asyncio.Future[Any] | None = None) -> None:
        super().buffer_message(msg, future)
        self.last_size = len(self.messages[-1][0])  # for the flow control's accounting


class _CancelledAtExit(logging.Filter):
    """dbus-fast logs a method cancelled at exit (after the bus is lost) as an error
    with its traceback; a cancelled call is no error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


logging.getLogger("dbus_fast.send_reply").addFilter(_CancelledAtExit())
logging.getLogger("dbus_fast.message_bus").addFilter(_CancelledAtExit())
log = structlog.get_logger("liveupdated.bus")


@dataclass
class _Peer:
    """What the daemon has written to one connection and not yet known taken."""

    group: tuple[bool, int | str]  # (admin, uid) when known, else (False, unique name)
    admitted: dict[int, int] = field(default_factory=dict)  # call serial -> fds reserved
    held: deque[Message] = field(default_factory=deque)
    count: int = 0  # replies written, not known taken
    bytes: int = 0
    fds: int = 0
    ping: tuple[int, int, int] | None = None  # (count, bytes, fds) written before it
    held_fds: int = 0
    closed: set[int] = field(default_factory=set)  # serials of held calls whose fds were closed
    # Admitted PreserveFd(s) calls: answered once their fds are stored and journaled,
    # which may take long (a full fd store queue); their small answers carry no fds, so
    # they do not count against the connection's REPLIES_PER_CONNECTION: a VMM's other
    # calls are answered meanwhile.
    slow: set[int] = field(default_factory=set)


@dataclass
class _Group:
    bytes: int = 0
    fds: int = 0  # written, not known taken, and reserved for admitted calls
    held_fds: int = 0


class FdOwningBus(MessageBus):
    """A MessageBus that closes the fds of every reply once the reply is on the wire,
    can tell when the reply to a given call has been written, waits for its socket
    when it is full and bounds what each connection has not taken yet (flow control)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reply_watchers: dict[int, Callable[[], None]] = {}
        self._in_flight: dict[str, set[int]] = {}  # sender -> serials of its calls
        self._peers: dict[str, _Peer] = {}
        self._groups: dict[tuple[bool, int | str], _Group] = {}
        self._totals = {False: _Group(), True: _Group()}  # tenants, admins
        self._releasing: Message | None = None
        self._ping_denied = False
        self.identify: Callable[[str | None], Any] = lambda name: None  # Callers.known

    # ---- flow control -----------------------------------------------------------

    def _peer(self, name: str) -> _Peer:
        peer = self._peers.get(name)
        if peer is None:
            caller = self.identify(name)
            group = (bool(caller.admin), int(caller.uid)) if caller else (False, name)
            peer = self._peers[name] = _Peer(group)
        elif isinstance(peer.group[1], str):
            caller = self.identify(name)  # known now: accounted under its uid from here
            if caller is not None:
                self._regroup(peer, (bool(caller.admin), int(caller.uid)))
        return peer

    def _regroup(self, peer: _Peer, group: tuple[bool, int]) -> None:
        """Move a connection, with what it has not taken yet, from the group of its
        unique name (its uid unknown: a tenant's budget) to its uid's. Waiting for it to
        have nothing outstanding left a root VMM that had two answers unconfirmed in the
        tenants' budget, held behind other connections' unread answers."""
        old = self._groups.pop(peer.group, _Group())
        new = self._groups.setdefault(group, _Group())
        new.bytes += old.bytes
        new.fds += old.fds
        new.held_fds += old.held_fds
        if group[0]:  # the tenants' totals counted it until now
            tenants, admins = self._totals[False], self._totals[True]
            tenants.bytes -= old.bytes
            tenants.fds -= old.fds
            admins.bytes += old.bytes
            admins.fds += old.fds
        peer.group = group

    def _group(self, peer: _Peer) -> _Group:
        return self._groups.setdefault(peer.group, _Group())

    def _drop_group(self, peer: _Peer) -> None:
        group = self._groups.get(peer.group)
        if group is not None and not (group.bytes or group.fds or group.held_fds):
            del self._groups[peer.group]

    def _admissible(self, peer: _Peer, msg: Message) -> bool:
        if self._ping_denied:
            return True
        if len(peer.admitted) - len(peer.slow) + peer.count >= REPLIES_PER_CONNECTION:
            return False
        admin = peer.group[0]
        group, total = self._group(peer), self._totals[admin]
        if peer.bytes >= BYTES_PER_CONNECTION or (
            not admin and (group.bytes >= BYTES_PER_UID or total.bytes >= BYTES_OF_TENANTS)
        ):
            return False
        need = _fds_in_answer(msg)
        if not need:
            return True
        reserved = sum(peer.admitted.values())
        if peer.fds + reserved + need > FDS_PER_CONNECTION:
            return False
        if admin:  # per connection only: see ADMINS_SHARE_NO_BUDGET
            return True
        return group.fds + need <= FDS_PER_UID and total.fds + need <= FDS_OF_TENANTS

    def _admit(self, peer: _Peer, msg: Message) -> None:
        need = _fds_in_answer(msg)
        peer.admitted[msg.serial] = need
        if msg.member in ("PreserveFd", "PreserveFds"):
            peer.slow.add(msg.serial)
        self._group(peer).fds += need
        self._totals[peer.group[0]].fds += need

    def gate(self, msg: Message) -> bool:
        """For the message handler: True when the call is held (answered later)."""
        sender = msg.sender
        if msg is self._releasing or sender is None or self._ping_denied:
            return False
        peer = self._peer(sender)
        if msg.serial in peer.admitted:
            return False
        if not peer.held and self._admissible(peer, msg):
            self._admit(peer, msg)
            return False
        self._hold(peer, msg)
        return True

    def _hold(self, peer: _Peer, msg: Message) -> None:
        """Keep the call for later; its fds within the uid's budget, else closed now."""
        group = self._group(peer)
        # dbus-fast's reader hands a message without fds the list it goes on filling
        # with the next messages' fds: a held message keeps a list of its own.
        fds = msg.unix_fds = list(msg.unix_fds)
        if fds:
            for fd in fds:
                os.set_inheritable(fd, False)
            kept = group.held_fds + len(fds) <= HELD_FDS_PER_UID or peer.group[0]
            if kept:
                group.held_fds += len(fds)
                peer.held_fds += len(fds)
            else:
                _close_all(fds)
                peer.closed.add(msg.serial)
        peer.held.append(msg)
        if peer.ping is None and peer.count:
            self._ping(msg.sender or "", peer)
        elif not peer.count and len(peer.held) == 1:
            # Held by a total, or while its uid was not known, with nothing of its own to
            # confirm: no Ping of its own will release it; look again now and then.
            self._loop.call_later(PING_RETRY, self._release_later, msg.sender or "", peer)

    def _release(self, name: str, peer: _Peer) -> None:
        """Dispatch held calls, in order, while the connection has room."""
        if isinstance(peer.group[1], str) and self._peers.get(name) is peer:
            self._peer(name)  # its uid may be known by now: counted under it
        while peer.held and self._peers.get(name) is peer and self._admissible(peer, peer.held[0]):
            msg = peer.held.popleft()
            self._admit(peer, msg)
            if msg.serial in peer.closed:
                peer.closed.discard(msg.serial)
                self.send(error_message(
                    msg, QUOTA_EXCEEDED, "too many fds held for this uid while its "
                    "connections did not read their replies; the call's fds were closed",
                    {"limit": "held-fds"}))
                continue
            if msg.unix_fds:
                peer.held_fds -= len(msg.unix_fds)
                self._group(peer).held_fds -= len(msg.unix_fds)
            self._releasing = msg
            try:
                self._process_message(msg)
            finally:
                self._releasing = None

    def _wrote(self, msg: Message, size: int) -> None:
        """A reply or unicast message to a client went to the writer."""
        name = msg.destination
        if not name or not name.startswith(":") or self._ping_denied:
            return
        peer = self._peers.get(name)
        if peer is None:
            if msg.message_type is MessageType.SIGNAL:
                return
            peer = self._peer(name)
        elif isinstance(peer.group[1], str):
            self._peer(name)  # its uid is known by its answer's time: counted under it
        reserved = peer.admitted.pop(msg.reply_serial, None) if msg.reply_serial else None
        peer.slow.discard(msg.reply_serial)
        group, total = self._group(peer), self._totals[peer.group[0]]
        fds = len(msg.unix_fds)
        if reserved:
            group.fds -= reserved
            total.fds -= reserved
        peer.count += 1
        peer.bytes += size
        peer.fds += fds
        group.bytes += size
        group.fds += fds
        total.bytes += size
        total.fds += fds
        if peer.ping is None and (
            peer.count >= PING_AFTER or peer.bytes >= PING_AFTER_BYTES or peer.fds
            or peer.held
        ):
            self._ping(name, peer)

    def _ping(self, name: str, peer: _Peer) -> None:
        if self._disconnected:
            return
        peer.ping = (peer.count, peer.bytes, peer.fds)
        ping = Message(destination=name, path="/", interface="org.freedesktop.DBus.Peer",
                       member="Ping")
        self._call(ping, lambda reply, err: self._pong(name, peer, reply))

    def _pong(self, name: str, peer: _Peer, reply: Message | None) -> None:
        if self._peers.get(name) is not peer or reply is None:
            return
        if reply.sender == name:  # from the peer itself: it read all before the Ping
            count, size, fds = peer.ping or (0, 0, 0)
            peer.ping = None
            self._taken(peer, count, size, fds)
            for other_name, other in list(self._peers.items()):
                if other.held:  # room may have come free in the totals too
                    self._release(other_name, other)
            if peer.count and (peer.held or peer.count >= PING_AFTER or peer.fds):
                self._ping(name, peer)
            elif not (peer.count or peer.admitted or peer.held):
                self._peers.pop(name, None)  # all taken: nothing to remember
                self._drop_group(peer)
            return
        peer.ping = None
        error = reply.error_name or ""
        if error in PEER_GONE:
            self.departed(name)
        elif error == "org.freedesktop.DBus.Error.AccessDenied":
            self._no_pings(reply)
        else:
            self._loop.call_later(PING_RETRY, self._ping_again, name, peer)

    def _release_later(self, name: str, peer: _Peer) -> None:
        if self._peers.get(name) is not peer or not peer.held or self._disconnected:
            return
        self._release(name, peer)
        if peer.held and not peer.count and peer.ping is None:
            self._loop.call_later(PING_RETRY, self._release_later, name, peer)
        elif peer.held and peer.ping is None:
            self._ping(name, peer)

    def _ping_again(self, name: str, peer: _Peer) -> None:
        if self._peers.get(name) is peer and peer.ping is None and (peer.count or peer.held):
            self._ping(name, peer)

    def _taken(self, peer: _Peer, count: int, size: int, fds: int) -> None:
        group, total = self._group(peer), self._totals[peer.group[0]]
        peer.count -= count
        peer.bytes -= size
        peer.fds -= fds
        group.bytes -= size
        group.fds -= fds
        total.bytes -= size
        total.fds -= fds

    def _no_pings(self, reply: Message) -> None:
        """The bus's policy refuses the daemon's Pings (an older policy file): replies
        count as taken once written, as without flow control."""
        log.error("flow_control_off", error=reply.error_name,
                  hint="the bus refuses org.freedesktop.DBus.Peer.Ping from root: install "
                       "liveupdated's dbus/org.liveupdate1.conf and reload the bus")
        self._ping_denied = True
        for name, peer in list(self._peers.items()):
            self._taken(peer, peer.count, peer.bytes, peer.fds)
            peer.ping = None
            self._release(name, peer)

    def departed(self, name: str) -> None:
        """`name` left the bus (NameOwnerChanged, or a Ping the bus could not deliver):
        its held calls' fds are closed and its accounting dropped."""
        self._in_flight.pop(name, None)
        peer = self._peers.pop(name, None)
        if peer is None:
            return
        group, total = self._group(peer), self._totals[peer.group[0]]
        for msg in peer.held:
            if msg.serial not in peer.closed:
                _close_all(msg.unix_fds)
        group.held_fds -= peer.held_fds
        reserved = sum(peer.admitted.values())
        self._taken(peer, peer.count, peer.bytes, peer.fds)
        group.fds -= reserved
        total.fds -= reserved
        self._drop_group(peer)
        for other_name, other in list(self._peers.items()):
            if other.held:
                self._release(other_name, other)

    def not_on_bus(self, name: str) -> None:
        """A client found gone without its NameOwnerChanged (lost on a full queue): the
        daemon's handlers are told as if the bus had said so."""
        signal = Message(
            message_type=MessageType.SIGNAL, sender="org.freedesktop.DBus",
            path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
            member="NameOwnerChanged", signature="sss", body=[name, name, ""], serial=1,
        )
        self._process_message(signal)

    # ---- the connection -----------------------------------------------------------

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
        self.departed(sender)

    async def connect(self) -> "FdOwningBus":
        await super().connect()
        writer = self._writer
        assert writer is not None and not writer.messages and writer.buf is None
        writer.__class__ = _PatientWriter  # the same writer, state and all
        return self

    def when_replied(self, serial: int, callback: Callable[[], None]) -> None:
        self._reply_watchers[serial] = callback

    def _finalize(self, err: Exception | None = None) -> None:
        """The bus is gone: calls waiting on it fail with a D-Bus error (which handlers
        answer, to no one) rather than the reader's EOFError (an internal error to them,
        logged with its traceback each: thousands of lines for one lost connection)."""
        if err is not None and not isinstance(err, DBusError):
            err = DBusError(DISCONNECTED, f"liveupdated lost its bus connection: {err!r}")
        super()._finalize(err)

    def send(self, msg: Message) -> asyncio.Future[Any]:  # type: ignore[override]
        if self._disconnected:  # nothing goes out any more: the daemon exits
            if msg.unix_fds and msg.message_type is MessageType.METHOD_RETURN:
                _close_all(msg.unix_fds)
            lost: asyncio.Future[Any] = self._loop.create_future()
            lost.set_result(None)
            return lost
        future: asyncio.Future[Any] = super().send(msg)
        if msg.message_type is not MessageType.METHOD_CALL:
            self._wrote(msg, getattr(self._writer, "last_size", 0))
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


def _fds_in_answer(msg: Message) -> int:
    """The most fds the answer to `msg` can carry."""
    if msg.member == "RetrieveFds" and msg.signature == "as":
        return min(len(msg.body[0]), FDS_PER_CONNECTION) if msg.body else 0
    return 1 if msg.member in ("RetrieveFd", "RetrieveQuarantined") else 0


async def watch_owners(bus: FdOwningBus, clients: Callable[[], Iterable[str]],
                       interval: float = OWNER_CHECK_INTERVAL) -> None:
    """Now and then, ask the bus whether each client with sessions is still there: a
    NameOwnerChanged the bus dropped (a full queue) must not keep a departed client's
    sessions. Runs for the daemon's life."""
    from liveupdated.bus import driver

    while True:
        await asyncio.sleep(interval)
        for name in sorted(clients()):
            with contextlib.suppress(LookupError):
                if not await driver.has_owner(bus, name):
                    bus.not_on_bus(name)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def limit_calls(
    bus: FdOwningBus, limit: int = MAX_CALLS_IN_FLIGHT
) -> Callable[[Message], Message | bool]:
    """A message handler, the first to run: counts each call expecting an answer against
    its sender's bound, refuses it (closing its fds) over the bound, holds it while its
    connection is past its share of the flow control, and forgets a sender that left
    the bus."""
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
        ):
            return False
        if bus.call_arrived(msg.sender, msg.serial, limit):
            return bus.gate(msg)  # held (answered later) or on to dispatch
        _close_all(msg.unix_fds)
        return error_message(msg, QUOTA_EXCEEDED, text,
                             {"limit": "calls-in-flight", "maximum": limit})

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
            return error_message(msg, ERROR_PREFIX + "InvalidArgument", _BAD_FD[member],
                                 {"command": f"Session.{member}"})
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
