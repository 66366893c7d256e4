"""Who is calling: the uid and systemd unit behind a bus connection, cached per name.

Unique bus names are never reused, so a resolved identity stays valid until the name
leaves the bus (NameOwnerChanged), when it is forgotten. A connection is looked up once
(GetConnectionCredentials): calls that arrive while its lookup is on the way wait for
that one. Each answer of dbus-daemon 1.16 and dbus-broker carries a pidfd (ProcessFD);
a lookup per call made a flood of calls a flood of pidfds. Like every fd the daemon
receives outside PreserveFd(s), it is closed once on arrival by the connection's fd
guard (bus/connection.py), never here: its number may be another fd's by now.
"""

import asyncio
import contextvars
import os
import re

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from liveupdated.bus import driver
from liveupdated.core.errors import AccessDenied, Timeout
from liveupdated.core.orchestrator import Caller

CURRENT_MESSAGE: contextvars.ContextVar[Message] = contextvars.ContextVar("current_message")
_UNIT_RE = re.compile(r"[^/]+\.(service|scope)$")
# A bus with full queues may drop its reply: the calls waiting on a lookup are then
# answered Timeout, and the connection's next call asks again.
LOOKUP_TIMEOUT = 10.0


def unit_of_pid(pid: int) -> str:
    """The systemd unit a process runs in, from its cgroup path ("" if none)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        path = line.split(":", 2)[-1]
        for part in reversed(path.split("/")):
            if _UNIT_RE.fullmatch(part):
                return part
    return ""


class Callers:
    def __init__(self, bus: MessageBus, system_bus: bool) -> None:
        self._bus = bus
        self._cache: dict[str, Caller] = {}
        self._lookups: dict[str, asyncio.Task[Caller]] = {}  # in flight, by sender
        self._admin_uids = {0} if system_bus else {0, os.getuid()}

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)
        self._lookups.pop(name, None)  # its answer, when it comes, is not kept

    def known(self, sender: str | None) -> Caller | None:
        """The caller behind `sender` if it has been resolved already."""
        return self._cache.get(sender) if sender else None

    async def current(self) -> Caller:
        """The caller of the method call being handled."""
        sender = CURRENT_MESSAGE.get().sender
        if not sender:
            raise AccessDenied("the call has no sender; cannot tell who is calling")
        caller = self._cache.get(sender)
        if caller is not None:
            return caller
        lookup = self._lookups.get(sender)
        if lookup is None:
            lookup = asyncio.get_running_loop().create_task(self._look_up(sender))
            # Its failure is each waiter's; with none left, it is not worth a warning.
            lookup.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._lookups[sender] = lookup
        # Shielded: a call whose handler is cancelled must not cancel the others' lookup.
        return await asyncio.shield(lookup)

    async def _look_up(self, sender: str) -> Caller:
        try:
            caller = await self._resolve(sender)
        finally:
            mine = self._lookups.get(sender) is asyncio.current_task()
            if mine:
                del self._lookups[sender]
        if mine:  # not forgotten meanwhile (the name left): kept for its next calls
            self._cache[sender] = caller
        return caller

    async def _resolve(self, sender: str) -> Caller:
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                creds = await driver.credentials(self._bus, sender)
        except LookupError:
            raise AccessDenied(f"cannot get the credentials of {sender}") from None
        except TimeoutError:
            raise Timeout(f"the bus did not say who {sender} is within {LOOKUP_TIMEOUT:g} s "
                          "(it drops replies when its queues are full); call again") from None
        uid = int(creds["UnixUserID"])
        pid = creds.get("ProcessID")
        unit = unit_of_pid(int(pid)) if pid is not None else ""
        return Caller(uid=uid, unit=unit, client=sender, admin=uid in self._admin_uids)

    async def has_owner(self, name: str) -> bool:
        try:
            return await driver.has_owner(self._bus, name)
        except LookupError:
            return False
