"""What the message handlers that answer calls beside dbus-fast's dispatch share: the
daemon's parts, the caller and session of a call, and tasks kept until they end."""

import asyncio
from collections.abc import Coroutine
from typing import Any

from dbus_fast import Message

from liveupdated.bus.callers import Callers
from liveupdated.bus.connection import FdOwningBus
from liveupdated.bus.session import SessionObjects
from liveupdated.core.orchestrator import Caller
from liveupdated.service import LiveUpdate


class MessageHandler:
    def __init__(
        self, bus: FdOwningBus, service: LiveUpdate, callers: Callers, sessions: SessionObjects
    ) -> None:
        self._bus = bus
        self._service = service
        self._callers = callers
        self._sessions = sessions
        self._tasks: set[asyncio.Task[None]] = set()

    def _session_call(self, msg: Message) -> tuple[Caller, str] | None:
        """The caller of a call on a session's path and that session, if the caller is
        known already and the session exists; else None (the Session object answers)."""
        caller = self._callers.known(msg.sender)
        session = self._sessions.name_at(msg.path or "")
        return None if caller is None or session is None else (caller, session)

    def _in_task(self, answer: Coroutine[Any, Any, None]) -> None:
        """Run `answer` in a task of its own, kept until it ends."""
        task = asyncio.get_running_loop().create_task(answer)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
