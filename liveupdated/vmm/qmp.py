"""A small asyncio QMP client (the QEMU Machine Protocol) over a unix socket, with fd
passing for add-fd."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any


class QmpError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, klass: str, desc: str) -> None:
        super().__init__(f"{command}: {klass}: {desc}")
        self.command, self.klass, self.desc = command, klass, desc


class QmpClosed(ConnectionError):
    """The QMP connection ended (QEMU exited)."""


class Qmp:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._ids = 0
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str, alive: Callable[[], bool] | None = None,
                      wait: float = 30.0) -> Qmp:
        """Connect once QEMU listens on `path` (retrying for `wait` seconds; `alive()`
        returning False stops the wait early), then negotiate capabilities."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if alive is not None and not alive():
                    raise QmpClosed(f"QEMU exited before it listened on {path}") from None
                if loop.time() > deadline:
                    raise TimeoutError(f"QEMU did not listen on {path} in {wait}s") from None
                await asyncio.sleep(0.01)
        qmp = cls(sock)
        greeting = await qmp._read()
        if "QMP" not in greeting:
            raise QmpClosed(f"not a QMP greeting: {greeting}")
        await qmp.execute("qmp_capabilities")
        return qmp

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      fds: Sequence[int] = ()) -> Any:
        async with self._lock:
            self._ids += 1
            request: dict[str, Any] = {"execute": command, "id": self._ids}
            if arguments:
                request["arguments"] = arguments
            data = json.dumps(request).encode() + b"\n"
            loop = asyncio.get_running_loop()
            try:
                if fds:
                    await self._send_fds(data, fds)
                else:
                    await loop.sock_sendall(self.sock, data)
            except OSError as exc:
                raise QmpClosed(f"{command}: QMP connection lost ({exc})") from None
            while True:
                message = await self._read()
                if message.get("id") != self._ids:
                    continue
                if "error" in message:
                    error = message["error"]
                    raise QmpError(command, error.get("class", "?"), error.get("desc", ""))
                return message.get("return")

    async def _send_fds(self, data: bytes, fds: Sequence[int]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sent = socket.send_fds(self.sock, [data], list(fds))
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
        if sent < len(data):
            await loop.sock_sendall(self.sock, data[sent:])

    async def _read(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                message: dict[str, Any] = json.loads(line)
                if "event" in message:
                    self.events.append(message)
                    continue
                return message
            try:
                chunk = await loop.sock_recv(self.sock, 65536)
            except OSError as exc:
                raise QmpClosed(f"QMP connection lost ({exc})") from None
            if not chunk:
                raise QmpClosed("QEMU closed its QMP connection")
            self._buffer += chunk

    def close(self) -> None:
        self.sock.close()


def reopen(fd: int, flags: int) -> int:
    """A new open file description of the file behind `fd` (its own offset and access
    mode), as QEMU's fdsets need: O_WRONLY to save into, O_RDONLY to load from."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
