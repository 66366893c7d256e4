"""The one table from our exceptions to D-Bus error names, the error replies built from
it, and the method wrapper using it.

Contract errors become org.liveupdate1.Error.<Name> with the body (s message, a{sv}
details) (contract.ERROR_SIGNATURE); anything unexpected is logged and answered as
org.freedesktop.DBus.Error.Failed, never with a traceback. Every edge that answers a
call itself (bus/preserve.py, retrieve.py, visibility.py, connection.py, session.py)
builds its error replies here, so that no reply of the contract has a bare (s) body.
"""

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from dbus_fast import DBusError, Message, MessageType, Variant

from liveupdated.bus.callers import CURRENT_MESSAGE
from liveupdated.contract import ERROR_DETAILS, ERROR_PREFIX, ERROR_SIGNATURE
from liveupdated.core.errors import ALL_ERRORS, Details, LiveUpdateError

log = structlog.get_logger("liveupdated.bus")

FAILED = "org.freedesktop.DBus.Error.Failed"
ERROR_NAMES: dict[type[LiveUpdateError], str] = {
    cls: ERROR_PREFIX + cls.name for cls in ALL_ERRORS
}

T = TypeVar("T")


def details_body(details: Details) -> dict[str, Variant]:
    """The a{sv} of `details`, each value typed as contract.ERROR_DETAILS says. A key the
    contract does not declare is a bug of ours: logged and left out, never a failed reply
    (tests/test_error_details.py finds every key used in the source)."""
    body: dict[str, Variant] = {}
    for key, value in details.items():
        signature = ERROR_DETAILS.get(key)
        if signature is None:
            log.error("undeclared_error_detail", key=key)
            continue
        body[key] = Variant(signature, list(value) if isinstance(value, list | tuple) else value)
    return body


def error_message(msg: Message, name: str, text: str, details: Details | None = None) -> Message:
    """The reply to `msg` with contract error `name`: (text, details)."""
    return Message(
        message_type=MessageType.ERROR,
        reply_serial=msg.serial,
        destination=msg.sender,
        error_name=name,
        signature=ERROR_SIGNATURE,
        body=[text, details_body(details or {})],
    )


class ContractError(DBusError):
    """A DBusError whose reply carries the contract's body, (s message, a{sv} details):
    dbus-fast's own DBusError answers with (s) alone."""

    def __init__(self, name: str, text: str, details: Details | None = None) -> None:
        super().__init__(name, text)
        self.details: Details = dict(details or {})

    def _as_message(self, msg: Message) -> Message:  # dbus-fast's hook for the reply
        return error_message(msg, self.type, self.text, self.details)


def to_dbus_error(exc: BaseException) -> DBusError:
    if isinstance(exc, DBusError):
        return exc
    if isinstance(exc, LiveUpdateError):
        for cls, name in ERROR_NAMES.items():
            if isinstance(exc, cls):
                return ContractError(name, str(exc), exc.details)
    log.error("internal_error", exc_info=exc)
    return DBusError(FAILED, f"internal error in liveupdated: {exc.__class__.__name__}: {exc}")


def error_reply(msg: Message, exc: BaseException) -> Message:
    """The error reply to `msg` for `exc`, as the `contract` wrapper would have it sent."""
    return to_dbus_error(exc)._as_message(msg)


def contract(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wrap an async D-Bus method so every exception leaves as a contract error."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> T:
        msg = CURRENT_MESSAGE.get(None)
        sender = msg.sender if msg is not None else None
        with structlog.contextvars.bound_contextvars(sender=sender, method=fn.__name__):
            try:
                return await fn(*args)
            except Exception as exc:
                raise to_dbus_error(exc) from exc

    return wrapper
