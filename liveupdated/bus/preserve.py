"""PreserveFd without dbus-fast's generic dispatch: the one call a VMM makes per fd.

A well-formed PreserveFd from a caller already known is decided at once, and answered
when the group commit holding its records is durable, in order of arrival. Anything
else (an unknown caller first of all) falls through to the Session object's method.
"""

import asyncio

import structlog
from dbus_fast import Message, MessageFlag

from liveupdated.bus.callers import Callers
from liveupdated.bus.connection import FdOwningBus, preserve_fd_index
from liveupdated.bus.errors import FAILED, to_dbus_error
from liveupdated.bus.session import SessionObjects
from liveupdated.core.records import Record
from liveupdated.service import LiveUpdate

METHOD = "preserve_fd"  # the name the Session object's method logs under


class PreserveFdCalls:
    def __init__(
        self, bus: FdOwningBus, service: LiveUpdate, callers: Callers, sessions: SessionObjects
    ) -> None:
        self._bus = bus
        self._service = service
        self._callers = callers
        self._sessions = sessions
        self._waiting: list[tuple[Message, list[Record]]] = []
        self._arrived = asyncio.Event()

    def handle(self, msg: Message) -> bool:
        """A message handler, after fd_guard: True when the call is taken here."""
        index = preserve_fd_index(msg, self._sessions.__contains__)
        if index is None or msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return False  # the Session object's method handles it, or answers the error
        caller = self._callers.known(msg.sender)
        session = self._sessions.name_at(msg.path or "")
        if caller is None or session is None:
            return False
        token, _, requires = msg.body
        try:
            records = self._service.begin_preserve_fd(
                caller, session, token, msg.unix_fds[index], requires
            )
        except Exception as exc:
            with structlog.contextvars.bound_contextvars(sender=msg.sender, method=METHOD):
                raise to_dbus_error(exc) from exc
        self._waiting.append((msg, records))
        self._arrived.set()
        return True

    async def answer(self) -> None:
        """Reply to each taken call once its records are durable; runs for the daemon's life."""
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            calls, self._waiting = self._waiting, []
            try:
                await self._service.flush()
            except OSError as exc:  # the service has failed and the daemon exits
                for msg, _ in calls:
                    self._bus.send(Message.new_error(msg, FAILED, f"journal write failed: {exc}"))
                continue
            by_sender: dict[str | None, list[Record]] = {}
            for msg, records in calls:
                by_sender.setdefault(msg.sender, []).extend(records)
            for sender, records in by_sender.items():
                with structlog.contextvars.bound_contextvars(sender=sender, method=METHOD):
                    self._service.finish_preserve_fd(records)
            for msg, _ in calls:
                self._bus.send(Message.new_method_return(msg))
