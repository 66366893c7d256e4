"""The daemon's bus connection: owns every fd that crosses it.

dbus-fast never closes an fd it receives or sends. Here, each received fd is made
close-on-exec and closed at once unless it is an fd argument of a well-formed PreserveFd
or PreserveFds; each fd the daemon sends in a reply is a dup that is closed once written.
"""

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from liveupdated.bus import ERROR_PREFIX, SESSION_INTERFACE
from liveupdated.bus.callers import CURRENT_MESSAGE

PRESERVE_SIGNATURE = "shas"
PRESERVE_ALL_SIGNATURE = "a(shas)"
_BAD_FD = {
    "PreserveFd": "the fd argument names no passed fd",
    "PreserveFds": "each fd argument must name a passed fd of its own (to preserve one fd "
    "under two tokens, pass it twice)",
}


class FdOwningBus(MessageBus):
    """A MessageBus that closes the fds of every reply once the reply is on the wire,
    and can tell when the reply to a given call has been written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reply_watchers: dict[int, Callable[[], None]] = {}

    def when_replied(self, serial: int, callback: Callable[[], None]) -> None:
        self._reply_watchers[serial] = callback

    def send(self, msg: Message) -> asyncio.Future[Any]:  # type: ignore[override]
        future: asyncio.Future[Any] = super().send(msg)
        if msg.unix_fds and msg.message_type is MessageType.METHOD_RETURN:
            fds = list(msg.unix_fds)
            future.add_done_callback(lambda _: _close_all(fds))
        watcher = self._reply_watchers.pop(msg.reply_serial, None) if msg.reply_serial else None
        if watcher is not None:
            future.add_done_callback(lambda _: watcher())
        return future


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def fd_guard(
    is_session_path: Callable[[str], bool], take_preserve_fd: Callable[[Message, int], bool]
) -> Callable[[Message], Message | bool]:
    """A message handler that runs before dispatch: records the current message and
    closes every received fd that no method will take ownership of. A well-formed
    PreserveFd is offered to `take_preserve_fd` (with the index of its fd) first; when
    that takes it, it is handled, else dispatched."""

    def handle(msg: Message) -> Message | bool:
        CURRENT_MESSAGE.set(msg)
        fds = msg.unix_fds
        for fd in fds:
            os.set_inheritable(fd, False)
        member = _preserve_call(msg, is_session_path)
        if member is None:
            _close_all(fds)
            return False
        keep = _owned_indices(msg, member)
        _close_all([fd for i, fd in enumerate(fds) if keep is None or i not in keep])
        if keep is None:  # also with no fds at all: an index must never reach a method
            if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
                return True
            return Message.new_error(msg, ERROR_PREFIX + "InvalidArgument", _BAD_FD[member])
        if member == "PreserveFd":
            return take_preserve_fd(msg, next(iter(keep)))
        if member == "PreserveFds":
            # dbus-fast unmarshals structs as tuples, then fails to put the fds into them
            # (its dispatch raises TypeError and the fds would stay open): lists it can fill.
            entries = msg.body[0]
            entries[:] = [list(entry) for entry in entries]
        return False

    return handle


def _preserve_member(msg: Message) -> str | None:
    """PreserveFd or PreserveFds, when msg calls one with its signature."""
    if msg.interface not in (SESSION_INTERFACE, None):
        return None
    if msg.member == "PreserveFd" and msg.signature == PRESERVE_SIGNATURE:
        return "PreserveFd"
    if msg.member == "PreserveFds" and msg.signature == PRESERVE_ALL_SIGNATURE:
        return "PreserveFds"
    return None


def _preserve_call(msg: Message, is_session_path: Callable[[str], bool]) -> str | None:
    """PreserveFd or PreserveFds, when msg is a call of one on a session object."""
    path = msg.path
    if msg.message_type is not MessageType.METHOD_CALL or path is None:
        return None
    return _preserve_member(msg) if is_session_path(path) else None


def _owned_indices(msg: Message, member: str) -> frozenset[int] | None:
    """Indices of the fds a PreserveFd(s) call will own, or None if the call must be
    rejected: each fd argument must be the index of a passed fd, no two the same."""
    body = msg.body
    indices = [body[1]] if member == "PreserveFd" else [entry[1] for entry in body[0]]
    if not all(isinstance(i, int) and 0 <= i < len(msg.unix_fds) for i in indices):
        return None
    owned = frozenset(indices)
    return owned if len(owned) == len(indices) else None
