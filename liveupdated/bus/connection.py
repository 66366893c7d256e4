"""The daemon's bus connection: owns every fd that crosses it.

dbus-fast never closes an fd it receives or sends. Here, each received fd is made
close-on-exec and closed at once unless it is the argument of a well-formed PreserveFd;
each fd the daemon sends in a reply is a dup that is closed once written.
"""

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from liveupdated.bus import ERROR_PREFIX, SESSION_INTERFACE
from liveupdated.bus.callers import CURRENT_MESSAGE

PRESERVE_SIGNATURE = "shas"
PRESERVE_ALL_SIGNATURE = "a(shas)"


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


def fd_guard(is_session_path: Callable[[str], bool]) -> Callable[[Message], Message | bool]:
    """A message handler that runs before dispatch: records the current message and
    closes every received fd that no method will take ownership of."""

    def handle(msg: Message) -> Message | bool:
        CURRENT_MESSAGE.set(msg)
        fds = msg.unix_fds
        for fd in fds:
            os.set_inheritable(fd, False)
        if not _calls_preserve(msg, is_session_path):
            _close_all(fds)
            return False
        keep = _owned_indices(msg)
        _close_all([fd for i, fd in enumerate(fds) if keep is None or i not in keep])
        if keep is None:  # also with no fds at all: an index must never reach a method
            return Message.new_error(
                msg, ERROR_PREFIX + "InvalidArgument",
                "each fd argument must name a passed fd of its own",
            )
        if msg.member == "PreserveFds":
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


def _calls_preserve(msg: Message, is_session_path: Callable[[str], bool]) -> bool:
    path = msg.path
    return (
        msg.message_type is MessageType.METHOD_CALL
        and _preserve_member(msg) is not None
        and path is not None
        and is_session_path(path)
    )


def _owned_indices(msg: Message) -> frozenset[int] | None:
    """Indices of the fds a PreserveFd(s) call will own, or None if the call must be
    rejected: each fd argument must be the index of a passed fd, no two the same."""
    body = msg.body
    indices = [body[1]] if msg.member == "PreserveFd" else [entry[1] for entry in body[0]]
    if not all(isinstance(i, int) and 0 <= i < len(msg.unix_fds) for i in indices):
        return None
    owned = frozenset(indices)
    return owned if len(owned) == len(indices) else None


def preserve_fd_index(msg: Message, is_session_path: Callable[[str], bool]) -> int | None:
    """Index of the fd a PreserveFd call will own, or None if the call will be rejected."""
    if msg.member != "PreserveFd" or not _calls_preserve(msg, is_session_path):
        return None
    owned = _owned_indices(msg)
    return next(iter(owned)) if owned else None
