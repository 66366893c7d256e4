"""RetrieveFd without dbus-fast's generic dispatch: after the reboot every VMM asks for
its fds one call each, inside the blackout.

A well-formed RetrieveFd from a caller already known, on the path of a session, is
answered by a task of its own (as dbus-fast would, without its argument and reply
machinery): the service decides and restores, and the reply carries the new fd, which
the bus closes once it is written. Anything else (an unknown caller first of all) falls
through to the Session object's method, which answers the same way.
"""

import structlog
from dbus_fast import Message, MessageFlag, MessageType

from liveupdated.bus import SESSION_INTERFACE
from liveupdated.bus.errors import error_reply
from liveupdated.bus.handler import MessageHandler
from liveupdated.core.orchestrator import Caller

METHOD = "retrieve_fd"  # the name the Session object's method logs under


class RetrieveFdCalls(MessageHandler):
    def handle(self, msg: Message) -> bool:
        """A message handler: True when the call is taken here (and answered later)."""
        if (
            msg.member != "RetrieveFd"
            or msg.message_type is not MessageType.METHOD_CALL
            or msg.interface != SESSION_INTERFACE
            or msg.signature != "s"
            or msg.unix_fds
            or msg.flags & MessageFlag.NO_REPLY_EXPECTED
        ):
            return False
        call = self._session_call(msg)
        if call is None:
            return False
        self._in_task(self._answer(msg, *call, msg.body[0]))
        return True

    async def _answer(self, msg: Message, caller: Caller, session: str, token: str) -> None:
        with structlog.contextvars.bound_contextvars(sender=msg.sender, method=METHOD):
            try:
                fd = await self._service.retrieve_fd(caller, session, token)
            except Exception as exc:
                self._bus.send(error_reply(msg, exc))
                return
        self._bus.send(Message.new_method_return(msg, "h", [0], unix_fds=[fd]))
