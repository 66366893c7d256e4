"""The one table from our exceptions to D-Bus error names, and the method wrapper using it.

Contract errors become org.liveupdate1.Error.<Name>; anything unexpected is logged and
answered as org.freedesktop.DBus.Error.Failed, never with a traceback.
"""

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from dbus_fast import DBusError

from liveupdated.bus import ERROR_PREFIX
from liveupdated.bus.callers import CURRENT_MESSAGE
from liveupdated.core.errors import ALL_ERRORS, LiveUpdateError

log = structlog.get_logger("liveupdated.bus")

FAILED = "org.freedesktop.DBus.Error.Failed"
ERROR_NAMES: dict[type[LiveUpdateError], str] = {
    cls: ERROR_PREFIX + cls.name for cls in ALL_ERRORS
}

T = TypeVar("T")


def to_dbus_error(exc: BaseException) -> DBusError:
    if isinstance(exc, DBusError):
        return exc
    if isinstance(exc, LiveUpdateError):
        for cls, name in ERROR_NAMES.items():
            if isinstance(exc, cls):
                return DBusError(name, str(exc))
    log.error("internal_error", exc_info=exc)
    return DBusError(FAILED, f"internal error in liveupdated: {exc.__class__.__name__}: {exc}")


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
