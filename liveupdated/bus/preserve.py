"""PreserveFd without dbus-fast's generic dispatch: the one call a VMM makes per fd.

A well-formed PreserveFd from a caller already known is decided at once, and answered
when the group commit holding its records is durable, in order of arrival. Anything
else (an unknown caller first of all) falls through to the Session object's method.
"""

import asyncio

import structlog
from dbus_fast import Message, MessageFlag

from liveupdated.bus.callers import Callers
from liveupdated.bus.connection import FdOwningBus
from liveupdated.bus.errors import error_reply
from liveupdated.bus.handler import MessageHandler
from liveupdated.bus.session import SessionObjects
from liveupdated.core.orchestrator import Caller
from liveupdated.core.records import Record
from liveupdated.service import LiveUpdate

METHOD = "preserve_fd"  # the name the Session object's method logs under


class PreserveFdCalls(MessageHandler):
    def __init__(
        self, bus: FdOwningBus, service: LiveUpdate, callers: Callers, sessions: SessionObjects
    ) -> None:
        super().__init__(bus, service, callers, sessions)
        self._taking = True  # until finish()
        self._scheduled = 0  # taken calls not yet decided
        self._waiting: list[tuple[Message, list[Record]]] = []  # decided, not yet answered
        self._arrived = asyncio.Event()

    def take(self, msg: Message, index: int) -> bool:
        """For fd_guard, given a well-formed PreserveFd and the index of its fd: True when
        the call is taken here. It is decided on the loop's next turn, as the calls
        dbus-fast dispatches as tasks are: calls from one connection are decided in the
        order they were sent."""
        if not self._taking or msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return False  # the Session object's method handles it
        if self._service.storage_problem:
            return False  # degraded: the method tries to end that before it decides
        call = self._session_call(msg)
        if call is None:
            return False
        self._scheduled += 1
        asyncio.get_running_loop().call_soon(self._decide, msg, *call, msg.unix_fds[index])
        return True

    def _decide(self, msg: Message, caller: Caller, session: str, fd: int) -> None:
        self._scheduled -= 1
        token, _, requires = msg.body
        try:
            records = self._service.begin_preserve_fd(caller, session, token, fd, requires)
        except Exception as exc:
            with structlog.contextvars.bound_contextvars(sender=msg.sender, method=METHOD):
                reply = error_reply(msg, exc)
            self._bus.send(reply)
        else:
            self._waiting.append((msg, records))
        self._arrived.set()

    async def answer(self) -> None:
        """Reply to each taken call once its records are durable; runs for the daemon's life."""
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            await self._answer_waiting()

    async def finish(self) -> None:
        """At a clean stop: take no more calls, and answer those taken."""
        self._taking = False
        while self._scheduled or self._waiting:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            await self._answer_waiting()

    async def _answer_waiting(self) -> None:
        calls, self._waiting = self._waiting, []
        if not calls:
            return
        try:
            await self._service.flush()
        except asyncio.CancelledError:
            self._waiting[:0] = calls  # still to answer, at finish()
            raise
        except Exception as exc:  # the journal failed: the service is degraded now
            for msg, _ in calls:
                self._bus.send(error_reply(msg, exc))
            return
        by_sender: dict[str | None, list[Record]] = {}
        for msg, records in calls:
            by_sender.setdefault(msg.sender, []).extend(records)
        for sender, records in by_sender.items():
            with structlog.contextvars.bound_contextvars(sender=sender, method=METHOD):
                self._service.finish_preserve_fds(records)
        for msg, _ in calls:
            self._bus.send(Message.new_method_return(msg))
