"""Session objects are visible to their owner and root only.

dbus-fast answers Introspect, org.freedesktop.DBus.Properties and
ObjectManager.GetManagedObjects itself, for any path and to anyone: the child nodes of
/org/liveupdate1/session are the sessions' names, and their properties name their
owners. This message handler, which runs before dispatch, answers those calls as
ListSessions would:

- Introspect of /, /org, /org/liveupdate1 and /org/liveupdate1/session lists only the
  child nodes leading to sessions the caller may see;
- Introspect and Properties on a session's path (or below it) are answered AccessDenied
  to anyone but its owner and an admin (root; the daemon's own uid off the system bus),
  with the same answer whether or not the session exists, so names do not leak;
- GetManagedObjects, which lists every object with its properties, is for admins only.

An admin's calls, and allowed ones, take dbus-fast's own path. A caller not resolved yet
is resolved first (a bus round trip): the call is then answered from a task.
"""

import structlog
from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast import introspection as intr
from dbus_fast.send_reply import SendReply

from liveupdated.bus import ERROR_PREFIX
from liveupdated.bus.callers import CURRENT_MESSAGE
from liveupdated.bus.errors import error_message, error_reply
from liveupdated.bus.handler import MessageHandler
from liveupdated.core.errors import AccessDenied
from liveupdated.core.names import SESSION_PATH_PREFIX
from liveupdated.core.orchestrator import Caller

log = structlog.get_logger("liveupdated.bus")

INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
ACCESS_DENIED = ERROR_PREFIX + AccessDenied.name
SESSIONS_ROOT = SESSION_PATH_PREFIX.rstrip("/")
# The paths whose introspection lists children leading to sessions.
LISTING_PATHS = frozenset(
    ["/"] + ["/".join(SESSIONS_ROOT.split("/")[:n]) for n in range(2, SESSIONS_ROOT.count("/") + 2)]
)


class Visibility(MessageHandler):
    def handle(self, msg: Message) -> Message | bool:
        """The message handler: an answer, True when answered later (or not at all: no
        answer expected), False to let dbus-fast dispatch the call."""
        if msg.message_type is not MessageType.METHOD_CALL or not _guarded(msg):
            return False
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True  # nothing would be answered: nothing is done
        caller = self._callers.known(msg.sender)
        if caller is None:
            self._in_task(self._answer_later(msg))
            return True
        answer = self._answer(msg, caller)
        return answer if answer is not None else False

    async def _answer_later(self, msg: Message) -> None:
        CURRENT_MESSAGE.set(msg)
        with structlog.contextvars.bound_contextvars(sender=msg.sender, method=msg.member):
            try:
                caller = await self._callers.current()
                answer = self._answer(msg, caller)
                if answer is None:
                    self._dispatch(msg)
                    return
            except Exception as exc:
                answer = error_reply(msg, exc)
        self._bus.send(answer)

    def _answer(self, msg: Message, caller: Caller) -> Message | None:
        """An answer, or None when dbus-fast's own answer is the caller's to have."""
        if caller.admin:
            return None
        path = msg.path or ""
        if msg.interface == OBJECT_MANAGER:
            return error_message(
                msg, ACCESS_DENIED, "GetManagedObjects lists every session; only root may call it"
            )
        if path.startswith(SESSION_PATH_PREFIX):
            if self._may_see(path, caller):
                return None
            return error_message(
                msg, ACCESS_DENIED, f"only the owner of a session or root may inspect {path}"
            )
        return self._listing(msg, path, caller)

    def _may_see(self, path: str, caller: Caller) -> bool:
        """May the caller see the object at `path` (on or below a session's path)?"""
        if caller.admin or not path.startswith(SESSION_PATH_PREFIX):
            return True
        label = path[len(SESSION_PATH_PREFIX):].split("/", 1)[0]
        name = self._sessions.name_at(SESSION_PATH_PREFIX + label)
        return name is not None and self._service.core.may_use(caller, name)

    def _listing(self, msg: Message, path: str, caller: Caller) -> Message:
        """dbus-fast's introspection of `path`, with only the child nodes that lead to
        objects the caller may see."""
        node = self._bus._introspect_export_path(path)
        prefix = path if path == "/" else path + "/"
        children = {
            exported[len(prefix):].split("/", 1)[0]
            for exported in self._bus._path_exports
            if exported.startswith(prefix) and self._may_see(exported, caller)
        }
        node.nodes = [intr.Node(child) for child in sorted(children) if child]
        return Message.new_method_return(msg, "s", [node.tostring()])

    def _dispatch(self, msg: Message) -> None:
        """Answer an allowed call as dbus-fast's dispatch would have."""
        bus = self._bus
        handler = {
            INTROSPECTABLE: bus._default_introspect_handler,
            PROPERTIES: bus._default_properties_handler,
            OBJECT_MANAGER: bus._default_get_managed_objects_handler,
        }[msg.interface or ""]
        with SendReply(bus, msg) as send_reply:
            handler(msg, send_reply)


def _guarded(msg: Message) -> bool:
    """Is msg a call this handler decides on?"""
    path = msg.path or ""
    if msg.interface == INTROSPECTABLE:
        return (
            msg.member == "Introspect"
            and msg.signature == ""
            and (path in LISTING_PATHS or path.startswith(SESSION_PATH_PREFIX))
        )
    if msg.interface == PROPERTIES:
        return path.startswith(SESSION_PATH_PREFIX)
    return msg.interface == OBJECT_MANAGER and msg.member == "GetManagedObjects"
