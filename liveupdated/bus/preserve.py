"""PreserveFd without dbus-fast's generic dispatch: the one call a VMM makes per fd.

A well-formed PreserveFd from a caller already known has its plan started at once (it
decides, and waits on the flush), and is answered when the group commit holding its
records is durable, in order of arrival: the plans started meanwhile are carried on
together, one flush for all. Anything else (an unknown caller first of all) falls through
to the Session object's method.
"""

import asyncio

import structlog
from dbus_fast import Message, MessageFlag

from liveupdated.bus.callers import Callers
from liveupdated.bus.connection import FdOwningBus
from liveupdated.bus.errors import error_reply
from liveupdated.bus.handler import MessageHandler
from liveupdated.bus.session import SessionObjects
from liveupdated.core import commands
from liveupdated.core.orchestrator import Caller
from liveupdated.service import LiveUpdate, Running

METHOD = "preserve_fd"  # the name the Session object's method logs under


class PreserveFdCalls(MessageHandler):
    def __init__(
        self, bus: FdOwningBus, service: LiveUpdate, callers: Callers, sessions: SessionObjects
    ) -> None:
        super().__init__(bus, service, callers, sessions)
        self._taking = True  # until finish()
        self._scheduled = 0  # taken calls not yet decided
        self._waiting: list[tuple[Message, Running[None]]] = []  # started, not yet answered
        self._arrived = asyncio.Event()

    def take(self, msg: Message, index: int) -> bool:
        """For fd_guard, given a well-formed PreserveFd and the index of its fd: True when
        the call is taken here. It is decided on the loop's next turn, as the calls
        dbus-fast dispatches as tasks are: calls from one connection are decided in the
        order they were sent."""
        if not self._taking or msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return False  # the Session object's method handles it
        call = self._session_call(msg)
        if call is None:
            return False
        self._scheduled += 1
        asyncio.get_running_loop().call_soon(self._decide, msg, *call, msg.unix_fds[index])
        return True

    def _decide(self, msg: Message, caller: Caller, session: str, fd: int) -> None:
        self._scheduled -= 1
        token, _, requires = msg.body
        service = self._service
        running = service.start(
            commands.preserve_fds(
                service.core, caller, session, [(token, fd, requires)], "PreserveFd"),
            {"sender": msg.sender, "method": METHOD})
        if running.pending is None:  # refused before it waited on anything
            self._reply(msg, running)
        else:
            self._waiting.append((msg, running))
        self._arrived.set()

    def _reply(self, msg: Message, running: Running[None]) -> None:
        try:
            running.result()
        except Exception as exc:
            with structlog.contextvars.bound_contextvars(sender=msg.sender, method=METHOD):
                reply = error_reply(msg, exc)
            self._bus.send(reply)
        else:
            self._bus.send(Message.new_method_return(msg))

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
            await self._service.run_together([running for _, running in calls])
        except asyncio.CancelledError:
            self._waiting[:0] = calls  # still to answer, at finish()
            raise
        for msg, running in calls:
            self._reply(msg, running)
