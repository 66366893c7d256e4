"""Calls with the wrong signature: answered org.freedesktop.DBus.Error.InvalidArgs naming
the signature the member takes, as sd-bus and GDBus services answer, where dbus-fast
would say UnknownMethod (a C client then believes the method is missing).

A message handler that runs before the fd guard and every dispatching handler; it closes
the fds of a call it answers (the daemon owns every fd it receives) and never lets such
a call through to a method.
"""

import contextlib
import inspect
import os

from dbus_fast import ErrorType, Message, MessageFlag, MessageType
from dbus_fast.service import ServiceInterface, _Method

from liveupdated.bus.manager import Manager
from liveupdated.bus.session import SessionObject
from liveupdated.contract import (
    MANAGER_INTERFACE,
    MANAGER_PATH,
    SESSION_INTERFACE,
    SESSION_PATH_PREFIX,
)


def in_signatures(kind: type[ServiceInterface]) -> dict[str, str]:
    """Each method's name and the signature of its arguments, as dbus-fast exports them
    (read from the class, as ServiceInterface.__init__ reads it)."""
    found: dict[str, str] = {}
    for _, member in inspect.getmembers(kind):
        method = getattr(member, "__dict__", {}).get("__DBUS_METHOD")
        if isinstance(method, _Method) and not method.disabled:
            found[method.name] = method.in_signature
    return found


# By interface: the members of org.liveupdate1.Manager and org.liveupdate1.Session.
SIGNATURES: dict[str, dict[str, str]] = {
    MANAGER_INTERFACE: in_signatures(Manager),
    SESSION_INTERFACE: in_signatures(SessionObject),
}


def _interface_at(path: str) -> str | None:
    """The interface of ours at `path`, whether or not a session is exported there: the
    answer to a wrong signature must not tell which session names exist."""
    if path == MANAGER_PATH:
        return MANAGER_INTERFACE
    label = path.removeprefix(SESSION_PATH_PREFIX)
    if label != path and label and "/" not in label:
        return SESSION_INTERFACE
    return None


def reject_wrong_signatures(msg: Message) -> Message | bool:
    """The message handler: a METHOD_CALL of a member of org.liveupdate1.Manager (on the
    manager's path) or org.liveupdate1.Session (on a session's path), with or without the
    interface named, whose signature is not the member's, is answered InvalidArgs (no
    answer when none is expected) and its fds are closed. Everything else goes on."""
    if msg.message_type is not MessageType.METHOD_CALL:
        return False
    interface = _interface_at(msg.path or "")
    if interface is None or msg.interface not in (interface, None):
        return False
    expected = SIGNATURES[interface].get(msg.member or "")
    if expected is None or msg.signature == expected:
        return False
    for fd in msg.unix_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
        return True
    return Message.new_error(
        msg, ErrorType.INVALID_ARGS,
        f'{interface}.{msg.member} takes the signature "{expected}", not "{msg.signature}"',
    )
