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
        if not fds:
            return False
        for fd in fds:
            os.set_inheritable(fd, False)
        keep = preserve_fd_index(msg, is_session_path)
        _close_all([fd for i, fd in enumerate(fds) if i != keep])
        if (
            keep is None
            and msg.message_type is MessageType.METHOD_CALL
            and _is_preserve(msg)
            and msg.path
            and is_session_path(msg.path)
        ):
            return Message.new_error(
                msg, ERROR_PREFIX + "InvalidArgument", "the fd argument names no passed fd"
            )
        return False

    return handle


def _is_preserve(msg: Message) -> bool:
    return (
        msg.member == "PreserveFd"
        and msg.interface in (SESSION_INTERFACE, None)
        and msg.signature == PRESERVE_SIGNATURE
    )


def preserve_fd_index(msg: Message, is_session_path: Callable[[str], bool]) -> int | None:
    """Index of the fd a PreserveFd call will own, or None if the call will be rejected."""
    if msg.message_type is not MessageType.METHOD_CALL or not _is_preserve(msg):
        return None
    if not msg.path or not is_session_path(msg.path):
        return None
    index = msg.body[1]
    if not isinstance(index, int) or not 0 <= index < len(msg.unix_fds):
        return None
    return index
