"""An asyncio client of the org.liveupdate1 contract, for VMMs written in Python.

Speaks D-Bus only, and takes every name, bound and error of the contract from
liveupdated.contract. Contract errors come back as the same exception classes the daemon
raises (contract.ALL_ERRORS, also importable from here), so `except NoSuchToken:` works on
the client side: `str(exc)` is the message, `exc.details` the error's details as data
(contract.ERROR_DETAILS; empty from a daemon that sends none).
Signals are believed only from liveupdated itself (`Client.follow_daemon`): on the
system bus anyone may send a look-alike StateChanged.
"""

import asyncio
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from dbus_fast import DBusError, Message, MessageType
from dbus_fast.aio import MessageBus

from liveupdated.bus import driver
from liveupdated.bus.address import connect
from liveupdated.contract import (
    ALL_ERRORS,
    BUS_NAME,
    ERROR_DETAILS,
    ERROR_PREFIX,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    SESSION_INTERFACE,
    AccessDenied,
    Corrupted,
    DependencyMissing,
    Details,
    InvalidArgument,
    LiveUpdateError,
    NoSuchSession,
    NoSuchToken,
    QuotaExceeded,
    SessionExists,
    Storage,
    Timeout,
    TokenExists,
    UnsupportedFd,
    WrongState,
)
from liveupdated.contract import MAX_FDS_PER_CALL as MAX_FDS_PER_MESSAGE

_ERRORS = {ERROR_PREFIX + cls.name: cls for cls in ALL_ERRORS}
# The bus refused to deliver the call (a queue or quota of the bus was full): the daemon
# never saw it, so sending it again is safe. Waits before each retry, then the error.
LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
# Each wait is drawn between half and all of its step, so that calls refused together
# do not all come back together.
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0)  # at most ~9 s in all


class BusError(Exception):
    """A D-Bus error outside the contract (no daemon, denied by bus policy, ...)."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


@dataclass(frozen=True)
class SessionInfo:
    name: str
    path: str
    owner: int
    state: str
    fd_count: int


@dataclass(frozen=True)
class QuarantinedInfo:
    id: str  # q<N>: what RetrieveQuarantined and ReleaseQuarantined take
    session: str
    token: str
    size: int
    reason: str


@dataclass(frozen=True)
class FdInfo:
    token: str
    kind: str
    requires: list[str]
    size: int


class Client:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        # The unique name that owns org.liveupdate1, while follow_daemon tracks it.
        self.daemon: str | None = None
        self._owner_changes = 0  # NameOwnerChanged seen: a GetNameOwner answer is stale
        self._on_signal: list[Callable[[Message], None]] = []
        self._on_owner: list[Callable[[str | None], None]] = []
        self._following = False

    @classmethod
    async def connect(cls, spec: str = "system") -> "Client":
        return cls(await connect(spec))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        # A Ping the daemon's flow control sent may still be read after this: answering it
        # on the closed connection made dbus-fast log a traceback. Nobody is there to ask.
        self.bus.add_message_handler(_swallow_ping)
        self.bus.disconnect()

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        unix_fds: Sequence[int] = (),
        destination: str = BUS_NAME,
    ) -> list[Any]:
        reply = await self.reply(path, interface, member, signature, body, unix_fds, destination)
        body_out = list(reply.body)
        if reply.unix_fds:
            body_out = [reply.unix_fds[v] if s.token == "h" else v
                        for s, v in zip(reply.signature_tree.types, body_out, strict=True)]
        return body_out

    async def reply(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        unix_fds: Sequence[int] = (),
        destination: str = BUS_NAME,
    ) -> Message:
        """The method return of a call (its fds are the caller's); an error raised.
        A call the bus refused with LimitsExceeded is sent again after a while, a few
        times (RETRY_DELAYS): a flood by someone else must not fail an update."""
        for delay in (*RETRY_DELAYS, None):
            reply = await self.bus.call(
                Message(
                    destination=destination,
                    path=path,
                    interface=interface,
                    member=member,
                    signature=signature,
                    body=list(body),
                    unix_fds=list(unix_fds),
                )
            )
            assert reply is not None
            if reply.error_name != LIMITS_EXCEEDED or delay is None:
                break
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        if reply.message_type is MessageType.ERROR:
            raise error_of(reply)
        return reply

    async def add_match(self, rule: str) -> None:
        await driver.add_match(self.bus, rule)

    async def follow_daemon(
        self,
        on_signal: Callable[[Message], None],
        on_owner: Callable[[str | None], None] | None = None,
    ) -> None:
        """Pass to `on_signal` every signal liveupdated itself sends this connection:
        its sender must be the unique name that owns org.liveupdate1 (tracked from
        GetNameOwner and the bus's NameOwnerChanged). Look-alikes from anyone else are
        dropped, broadcast or unicast: a unicast signal reaches a connection whatever
        its match rules. `on_owner` hears each change of owner (None: the daemon left).
        Add match rules for the signals wanted (`daemon_signal_rule`) afterwards."""
        self._on_signal.append(on_signal)
        if on_owner is not None:
            self._on_owner.append(on_owner)
        if self._following:
            return
        self._following = True
        self.bus.add_message_handler(self._signal_arrived)
        await self.add_match(
            f"type='signal',sender='{driver.DRIVER}',path='{driver.DRIVER_PATH}',"
            f"interface='{driver.DRIVER}',member='NameOwnerChanged',arg0='{BUS_NAME}'")
        seen = self._owner_changes
        try:
            (owner,) = await driver.call(self.bus, "GetNameOwner", "s", BUS_NAME)
        except LookupError:  # NameHasNoOwner: not running (yet)
            owner = None
        if self._owner_changes == seen:  # else a newer NameOwnerChanged already told
            self._owner_is(str(owner) if owner else None)

    def _signal_arrived(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.SIGNAL:
            return False
        if (msg.sender == driver.DRIVER and msg.member == "NameOwnerChanged"
                and msg.interface == driver.DRIVER and msg.path == driver.DRIVER_PATH
                and msg.signature == "sss" and msg.body[0] == BUS_NAME):
            self._owner_changes += 1
            self._owner_is(msg.body[2] or None)
        elif self.daemon is not None and msg.sender == self.daemon:
            for handler in list(self._on_signal):
                handler(msg)
        return False  # other handlers of this connection decide for themselves

    def _owner_is(self, owner: str | None) -> None:
        if owner == self.daemon:
            return
        self.daemon = owner
        for handler in list(self._on_owner):
            handler(owner)

    async def _manager(self, member: str, signature: str = "", *body: Any) -> list[Any]:
        return await self.call(MANAGER_PATH, MANAGER_INTERFACE, member, signature, body)

    async def property(self, name: str, path: str = MANAGER_PATH,
                       interface: str = MANAGER_INTERFACE) -> Any:
        (variant,) = await self.call(
            path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, name]
        )
        return variant.value

    async def properties(self, path: str = MANAGER_PATH,
                         interface: str = MANAGER_INTERFACE) -> dict[str, Any]:
        (values,) = await self.call(
            path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface]
        )
        return {k: v.value for k, v in values.items()}

    async def state(self) -> str:
        return str(await self.property("State"))

    async def create_session(self, name: str) -> "SessionClient":
        (path,) = await self._manager("CreateSession", "s", name)
        return SessionClient(self, name, path)

    async def retrieve_session(self, name: str) -> "SessionClient":
        (path,) = await self._manager("RetrieveSession", "s", name)
        return SessionClient(self, name, path)

    async def list_sessions(self) -> list[SessionInfo]:
        (rows,) = await self._manager("ListSessions")
        return [SessionInfo(*row) for row in rows]

    async def prepare(self) -> None:
        await self._manager("Prepare")

    async def freeze(self) -> None:
        await self._manager("Freeze")

    async def cancel(self) -> None:
        await self._manager("Cancel")

    async def reboot(self) -> None:
        await self._manager("Reboot")

    async def finish(self) -> None:
        await self._manager("Finish")

    async def get_history(self) -> list[dict[str, Any]]:
        """The update history (Manager.GetHistory), each cycle a plain dict."""
        (cycles,) = await self._manager("GetHistory")
        return [{k: v.value for k, v in cycle.items()} for cycle in cycles]

    async def drop_session(self, name: str, reason: str = "") -> None:
        await self._manager("DropSession", "ss", name, reason)

    async def list_quarantined(self) -> list[QuarantinedInfo]:
        (rows,) = await self._manager("ListQuarantined")
        return [QuarantinedInfo(*row) for row in rows]

    async def retrieve_quarantined(self, qid: str) -> int:
        (fd,) = await self._manager("RetrieveQuarantined", "s", qid)
        return int(fd)

    async def release_quarantined(self, qid: str) -> None:
        await self._manager("ReleaseQuarantined", "s", qid)


class SessionClient:
    def __init__(self, client: Client, name: str, path: str) -> None:
        self.client = client
        self.name = name
        self.path = path

    async def _call(self, member: str, signature: str = "", body: Sequence[Any] = (),
                    unix_fds: Sequence[int] = ()) -> list[Any]:
        return await self.client.call(
            self.path, SESSION_INTERFACE, member, signature, body, unix_fds
        )

    async def preserve_fd(self, token: str, fd: int, requires: Sequence[str] = ()) -> None:
        """Hand `fd` over; the caller keeps its own copy and may close it afterwards."""
        await self._call("PreserveFd", "shas", [token, 0, list(requires)], [fd])

    async def preserve_fds(self, fds: Sequence[tuple[str, int, Sequence[str]]]) -> None:
        """Hand several fds over in one call, each as (token, fd, requires): all are
        preserved, or none. At most MAX_FDS_PER_MESSAGE (16) a call: dbus-daemon drops
        the connection of a client that sends more in one message."""
        if len(fds) > MAX_FDS_PER_MESSAGE:
            raise InvalidArgument(
                f"PreserveFds takes at most {MAX_FDS_PER_MESSAGE} fds a call (dbus-daemon's "
                f"max_message_unix_fds), not {len(fds)}: hand the set over in several calls"
            )
        body = [[token, i, list(requires)] for i, (token, _, requires) in enumerate(fds)]
        await self._call("PreserveFds", "a(shas)", [body], [fd for _, fd, _ in fds])

    async def unpreserve_fd(self, token: str) -> None:
        await self._call("UnpreserveFd", "s", [token])

    async def retrieve_fd(self, token: str) -> int:
        """A new fd owned by the caller (close it when done)."""
        (fd,) = await self._call("RetrieveFd", "s", [token])
        os.set_inheritable(fd, False)
        return int(fd)

    async def retrieve_fds(self, tokens: Sequence[str]) -> list[tuple[str, int]]:
        """(token, fd) for each token, in order, all or none: new fds owned by the caller
        (close them when done). At most 16 tokens a call, as PreserveFds; the daemon
        refuses more with InvalidArgument."""
        reply = await self.client.reply(self.path, SESSION_INTERFACE, "RetrieveFds", "as",
                                        [list(tokens)])
        fds = list(reply.unix_fds)
        try:
            (pairs,) = reply.body
            got = [(str(token), fds[index]) for token, index in pairs]
            if len(got) != len(fds) or sorted(i for _, i in pairs) != list(range(len(fds))):
                raise BusError("org.freedesktop.DBus.Error.InvalidSignature",
                               "RetrieveFds replied with fds that do not match its body")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for _, fd in got:
            os.set_inheritable(fd, False)
        return got

    async def list_fds(self) -> list[FdInfo]:
        (rows,) = await self._call("ListFds")
        return [FdInfo(*row) for row in rows]

    async def fd_names(self) -> dict[str, str]:
        """Token -> the memfd's name as preserved ("" for none): after a kexec through
        the kernel backend the memfd itself comes back nameless."""
        (names,) = await self._call("FdNames")
        return {str(token): str(name) for token, name in names.items()}

    async def delay_freeze(self, enable: bool = True) -> None:
        await self._call("DelayFreeze", "b", [enable])

    async def ready_for_freeze(self) -> None:
        await self._call("ReadyForFreeze")

    async def finish(self) -> None:
        await self._call("Finish")

    async def close(self) -> None:
        await self._call("Close")

    async def properties(self) -> dict[str, Any]:
        return await self.client.properties(self.path, SESSION_INTERFACE)


def error_of(reply: Message) -> LiveUpdateError | BusError:
    """The exception for an error reply: a contract error by its name, with the message
    (the body's first string) and its details (the body's a{sv}, when it has one: a
    daemon before 0.4.0 sent the message alone); BusError for any other error."""
    body = list(reply.body)
    text = body[0] if body and isinstance(body[0], str) else ""
    name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
    if name not in _ERRORS:
        return BusError(name, text)
    details: Details = {}
    if len(body) > 1 and isinstance(body[1], dict):
        for key, variant in body[1].items():
            # An unknown key (of a newer daemon) is kept; a value of another type is not.
            value = getattr(variant, "value", None)
            if isinstance(value, str | int | list):
                details[str(key)] = value
    return _ERRORS[name](text, details)


def daemon_signal_rule(interface: str, member: str, path: str = MANAGER_PATH) -> str:
    """A match rule for one of liveupdated's signals. The bus matches sender= against
    the owner of the name, which spares this connection most look-alikes; the check in
    follow_daemon stays the one that counts (unicast signals ignore match rules)."""
    return (f"type='signal',sender='{BUS_NAME}',path='{path}',interface='{interface}',"
            f"member='{member}'")


__all__ = [
    "ERROR_DETAILS", "AccessDenied", "BusError", "Client", "Corrupted", "DBusError",
    "DependencyMissing", "FdInfo", "InvalidArgument", "LiveUpdateError", "NoSuchSession",
    "NoSuchToken", "QuotaExceeded", "SessionClient", "SessionExists", "SessionInfo", "Storage",
    "Timeout", "TokenExists", "UnsupportedFd", "WrongState", "daemon_signal_rule", "error_of",
]


def _swallow_ping(msg: Message) -> bool:
    return msg.member == "Ping" and msg.interface == "org.freedesktop.DBus.Peer"
