"""org.liveupdate1.Session: one VMM's fds, on /org/liveupdate1/session/<name>."""

import os
from typing import Annotated, Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusStr, DBusUInt32, DBusUInt64, DBusUnixFd
from dbus_fast.annotations import DBusSignature as Sig
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from liveupdated.bus import ERROR_PREFIX, SESSION_INTERFACE
from liveupdated.bus.callers import Callers
from liveupdated.bus.errors import contract, error_message
from liveupdated.contract import session_name_of
from liveupdated.core.names import SESSION_PATH_PREFIX, session_path
from liveupdated.core.orchestrator import Session
from liveupdated.service import LiveUpdate

StringList = Annotated[list[str], Sig("as")]
FdList = Annotated[list[list[Any]], Sig("a(ssast)")]
FdsToPreserve = Annotated[list[list[Any]], Sig("a(shas)")]
RetrievedFds = Annotated[list[list[Any]], Sig("a(sh)")]
FdNameMap = Annotated[dict[str, str], Sig("a{ss}")]


class SessionObject(ServiceInterface):
    def __init__(self, name: str, service: LiveUpdate, callers: Callers) -> None:
        super().__init__(SESSION_INTERFACE)
        self.session_name = name
        self._service = service
        self._callers = callers
        self.client = ""  # the session's connection when last seen: told of its removal

    @property
    def _session(self) -> Session:
        return self._service.core.session(self.session_name)

    @dbus_method(name="PreserveFd")
    @contract
    async def preserve_fd(self, token: DBusStr, fd: DBusUnixFd, requires: StringList) -> None:
        try:
            caller = await self._callers.current()
        except BaseException:
            os.close(fd)
            raise
        await self._service.preserve_fd(caller, self.session_name, token, fd, requires)

    @dbus_method(name="PreserveFds")
    @contract
    async def preserve_fds(self, fds: FdsToPreserve) -> None:
        entries = [(token, fd, requires) for token, fd, requires in fds]
        try:
            caller = await self._callers.current()
        except BaseException:
            for _, fd, _ in entries:
                os.close(fd)
            raise
        await self._service.preserve_fds(caller, self.session_name, entries, "PreserveFds")

    @dbus_method(name="UnpreserveFd")
    @contract
    async def unpreserve_fd(self, token: DBusStr) -> None:
        caller = await self._callers.current()
        await self._service.unpreserve_fd(caller, self.session_name, token)

    @dbus_method(name="RetrieveFd")
    @contract
    async def retrieve_fd(self, token: DBusStr) -> DBusUnixFd:
        caller = await self._callers.current()
        return await self._service.retrieve_fd(caller, self.session_name, token)

    @dbus_method(name="RetrieveFds")
    @contract
    async def retrieve_fds(self, tokens: StringList) -> RetrievedFds:
        caller = await self._callers.current()
        fds = await self._service.retrieve_fds(caller, self.session_name, tokens, "RetrieveFds")
        return [[token, fd] for token, fd in zip(tokens, fds, strict=True)]

    @dbus_method(name="ListFds")
    @contract
    async def list_fds(self) -> FdList:
        caller = await self._callers.current()
        session = self._service.core.owned_session(caller, self.session_name)
        vault = self._service.vault
        rows = []
        for token, entry in sorted(session.fds.items()):
            key = (self.session_name, token)
            size = os.fstat(vault.get(key)).st_size if key in vault else entry.size
            kind = f"{entry.kind} ({entry.problem})" if entry.problem else entry.kind
            rows.append([token, kind, list(entry.requires), size])
        return rows

    @dbus_method(name="FdNames")
    @contract
    async def fd_names(self) -> FdNameMap:
        """Token -> the memfd's name as it was preserved ("" for none), from the journal:
        a kernel that restores a memfd nameless does not take it from its owner."""
        caller = await self._callers.current()
        session = self._service.core.owned_session(caller, self.session_name)
        return {token: entry.name for token, entry in sorted(session.fds.items())}

    @dbus_method(name="DelayFreeze")
    @contract
    async def delay_freeze(self, enable: DBusBool) -> None:
        caller = await self._callers.current()
        await self._service.delay_freeze(caller, self.session_name, enable)

    @dbus_method(name="ReadyForFreeze")
    @contract
    async def ready_for_freeze(self) -> None:
        caller = await self._callers.current()
        await self._service.ready_for_freeze(caller, self.session_name)

    @dbus_method(name="Finish")
    @contract
    async def finish(self) -> None:
        caller = await self._callers.current()
        await self._service.finish_session(caller, self.session_name)

    @dbus_method(name="Close")
    @contract
    async def close(self) -> None:
        caller = await self._callers.current()
        await self._service.close_session(caller, self.session_name)

    @dbus_property(access=PropertyAccess.READ, name="Name")
    def name_(self) -> DBusStr:
        return self.session_name

    @dbus_property(access=PropertyAccess.READ, name="Owner")
    def owner(self) -> DBusUInt32:
        return self._session.uid

    @dbus_property(access=PropertyAccess.READ, name="Unit")
    def unit(self) -> DBusStr:
        return self._session.unit

    @dbus_property(access=PropertyAccess.READ, name="State")
    def state(self) -> DBusStr:
        return self._service.core.session_state(self._session)

    @dbus_property(access=PropertyAccess.READ, name="FdCount")
    def fd_count(self) -> DBusUInt32:
        return len(self._session.fds)

    @dbus_property(access=PropertyAccess.READ, name="PreservedBytes")
    def preserved_bytes(self) -> DBusUInt64:
        return self._session.preserved_bytes

    def values(self) -> dict[str, Variant]:
        """Every property, as GetAll answers them."""
        session = self._session
        return {
            "Name": Variant("s", session.name),
            "Owner": Variant("u", session.uid),
            "Unit": Variant("s", session.unit),
            "State": Variant("s", self._service.core.session_state(session)),
            "FdCount": Variant("u", len(session.fds)),
            "PreservedBytes": Variant("t", session.preserved_bytes),
        }

    def announce_change(self, bus: MessageBus) -> None:
        """PropertiesChanged for what a command may have changed, sent to the owner's
        connection only: a broadcast would tell every uid the session's name and state,
        which only its owner and root may see."""
        session = self._session
        changed = {
            "State": Variant("s", self._service.core.session_state(session)),
            "FdCount": Variant("u", len(session.fds)),
            "PreservedBytes": Variant("t", session.preserved_bytes),
        }
        bus.send(
            Message(
                message_type=MessageType.SIGNAL,
                destination=session.client,
                path=session_path(session.name),
                interface="org.freedesktop.DBus.Properties",
                member="PropertiesChanged",
                signature="sa{sv}as",
                body=[SESSION_INTERFACE, changed, []],
            )
        )


class SessionObjects:
    """The exported session objects, one per session of the core, by object path."""

    def __init__(self, bus: MessageBus, service: LiveUpdate, callers: Callers) -> None:
        self._bus = bus
        self._service = service
        self._callers = callers
        self._objects: dict[str, SessionObject] = {}

    def __contains__(self, path: str) -> bool:
        return path in self._objects

    def name_at(self, path: str) -> str | None:
        """The name of the session exported at `path`, if any."""
        obj = self._objects.get(path)
        return obj.session_name if obj is not None else None

    def answer_missing(self, msg: Message) -> Message | bool:
        """A message handler: a Session call on a path where no session is exported gets
        NoSuchSession, as RetrieveFd after a reboot does, not dbus-fast's UnknownMethod.
        (Its fds, if any, were closed by the fd guard, which runs first.)"""
        path = msg.path or ""
        if (
            msg.message_type is not MessageType.METHOD_CALL
            or msg.interface not in (SESSION_INTERFACE, None)
            or not path.startswith(SESSION_PATH_PREFIX)
            or path in self._objects
        ):
            return False
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True
        name = session_name_of(path)
        return error_message(
            msg, ERROR_PREFIX + "NoSuchSession",
            f"no session at {path}: CreateSession it in normal (a session lives with the "
            "connection that made it until Prepare), or RetrieveSession it after a reboot",
            {"session": name} if name is not None else {},
        )

    # dbus-fast's export and unexport broadcast ObjectManager's InterfacesAdded and
    # InterfacesRemoved, which name the session, its owner, unit and state to every
    # connection on the bus. Session objects are exported here without them; the
    # session's own connection is told, as it is told PropertiesChanged.

    def add(self, session: Session) -> None:
        path = session_path(session.name)
        if path in self._objects:  # announced already (a pipelined re-creation of it)
            return
        obj = SessionObject(session.name, self._service, self._callers)
        self._objects[path] = obj
        exports = self._bus._path_exports.setdefault(path, {})
        if obj.name in exports:
            raise ValueError(f"{path} is exported already")
        ServiceInterface._add_bus(obj, self._bus, self._bus._make_method_handler)
        exports[obj.name] = obj
        obj.client = session.client
        self._tell(obj, "InterfacesAdded", "oa{sa{sv}}", [path, {obj.name: obj.values()}])

    def remove(self, name: str) -> None:
        path = session_path(name)
        obj = self._objects.pop(path, None)
        if obj is None:
            return
        exports = self._bus._path_exports.get(path, {})
        if exports.pop(obj.name, None) is not None:
            ServiceInterface._remove_bus(obj, self._bus)
        if not exports:
            self._bus._path_exports.pop(path, None)
        self._tell(obj, "InterfacesRemoved", "oas", [path, [obj.name]])

    def _tell(self, obj: "SessionObject", member: str, signature: str, body: list[Any]) -> None:
        """An ObjectManager signal about a session, to its connection alone (none when
        its connection is unknown, as after a reboot; the bus answers nothing: a
        signal to a name that left is dropped)."""
        if not obj.client or not self._bus.connected:
            return
        self._bus.send(
            Message(
                message_type=MessageType.SIGNAL,
                destination=obj.client,
                path=session_path(obj.session_name),
                interface="org.freedesktop.DBus.ObjectManager",
                member=member,
                signature=signature,
                body=body,
                flags=MessageFlag.NO_REPLY_EXPECTED,
            )
        )

    def changed(self, session: Session) -> None:
        obj = self._objects.get(session_path(session.name))
        if obj is not None:
            obj.client = session.client
            obj.announce_change(self._bus)
