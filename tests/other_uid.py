"""A liveupdated client running as another uid, driven by JSON lines: the tests' second user.

Run by the venv's python *as root* (`python -m tests.other_uid UID [CGROUP]`): it imports
everything it will ever need first (the venv and the interpreter live under /root, which
the target uid cannot read), moves itself into CGROUP if given (a systemd unit stand-in),
drops to UID, connects to the bus named by $LUD_BUS and answers one JSON line per command
line on stdin: {"ok": ...} or {"error": "<ErrorName>", "message": ...}. EOF on stdin
disconnects from the bus and exits. `OtherUid` is the test side of that pipe.
"""

import asyncio
import concurrent.futures  # noqa: F401 - imported before the uid drop, used lazily by asyncio
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from liveupdated.client import BusError, Client, SessionClient
from liveupdated.core import errors
from liveupdated.core.names import session_path

_ERRORS: dict[str, type[errors.LiveUpdateError]] = {cls.name: cls for cls in errors.ALL_ERRORS}
REPO = Path(__file__).resolve().parent.parent


def digest(fd: int) -> dict[str, Any]:
    """Size and sha256 of a whole fd's content (small test memfds only)."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    return {"size": size, "sha256": hashlib.sha256(data).hexdigest()}


def content_digest(data: bytes, size: int) -> dict[str, Any]:
    """What `digest` says of a memfd of `size` bytes that starts with `data`."""
    whole = data + bytes(size - len(data))
    return {"size": size, "sha256": hashlib.sha256(whole).hexdigest()}


# ---- the child: one command per line -------------------------------------------------

_KEPT: dict[tuple[str, str], int] = {}  # memfds preserved with "keep": true


async def _execute(client: Client, op: str, args: dict[str, Any]) -> Any:
    def session(name: str) -> SessionClient:
        return SessionClient(client, name, session_path(name))

    match op:
        case "whoami":
            return {"uid": os.getuid(), "unique_name": client.bus.unique_name}
        case "create_session":
            return (await client.create_session(args["name"])).path
        case "retrieve_session":
            return (await client.retrieve_session(args["name"])).path
        case "list_sessions":
            return [list(vars(s).values()) for s in await client.list_sessions()]
        case "state":
            return await client.state()
        case "prepare" | "freeze" | "cancel" | "reboot" | "finish":
            await getattr(client, op)()
            return None
        case "drop_session":
            await client.drop_session(args["name"], args.get("reason", ""))
            return None
        case "list_quarantined":
            return [list(vars(q).values()) for q in await client.list_quarantined()]
        case "resize":  # a memfd kept with "keep": true grows or shrinks after the fact
            os.ftruncate(_KEPT[(args["session"], args["token"])], args["size"])
            return None
        case "preserve_fd":
            data = bytes.fromhex(args.get("data", ""))
            fd = os.memfd_create(args.get("memfd_name", "ram"), os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, args.get("size", len(data)))
                os.pwrite(fd, data, 0)
                await session(args["session"]).preserve_fd(
                    args["token"], fd, args.get("requires", [])
                )
            finally:
                if args.get("keep"):
                    _KEPT[(args["session"], args["token"])] = fd
                else:
                    os.close(fd)
            return None
        case "unpreserve_fd":
            await session(args["session"]).unpreserve_fd(args["token"])
            return None
        case "retrieve_fd":
            fd = await session(args["session"]).retrieve_fd(args["token"])
            try:
                return digest(fd)
            finally:
                os.close(fd)
        case "retrieve_fds":
            return _digests(await session(args["session"]).retrieve_fds(args["tokens"]))
        case "list_fds":
            return [list(vars(f).values()) for f in await session(args["session"]).list_fds()]
        case "fd_names":
            return await session(args["session"]).fd_names()
        case "session_properties":
            return await session(args["session"]).properties()
        case "delay_freeze":
            await session(args["session"]).delay_freeze(args.get("enable", True))
            return None
        case "ready_for_freeze":
            await session(args["session"]).ready_for_freeze()
            return None
        case "finish_session":
            await session(args["session"]).finish()
            return None
        case "close":
            await session(args["session"]).close()
            return None
    raise ValueError(f"unknown op {op!r}")


def _digests(got: list[tuple[str, int]]) -> list[list[Any]]:
    """[token, digest] of each (token, fd) retrieved; the fds closed."""
    try:
        return [[token, digest(fd)] for token, fd in got]
    finally:
        for _, fd in got:
            os.close(fd)


async def _serve(address: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 << 20)  # a command may carry 20,000 names
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    client = await Client.connect(address)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            op = command.pop("op")
            try:
                answer: dict[str, Any] = {"ok": await _execute(client, op, command)}
            except errors.LiveUpdateError as exc:
                answer = {"error": exc.name, "message": str(exc), "details": exc.details}
            except BusError as exc:
                answer = {"error": exc.name, "message": exc.text}
            except Exception as exc:
                answer = {"error": f"test-client:{type(exc).__name__}", "message": str(exc)}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        client.close()


def main() -> None:
    uid = int(sys.argv[1])
    if len(sys.argv) > 2:
        Path(sys.argv[2], "cgroup.procs").write_text(str(os.getpid()))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    asyncio.run(_serve(os.environ["LUD_BUS"]))


# ---- the test side -------------------------------------------------------------------


class OtherUid:
    """`async with OtherUid(address) as nobody:` a connected client running as uid 65534.

    `await nobody.call("create_session", name="vm")` returns the command's result or
    raises the contract's exception class (liveupdated.core.errors) for its error name,
    or BusError for any other error.
    """

    def __init__(self, bus_address: str, uid: int = 65534, cgroup: Path | None = None) -> None:
        self.bus_address = bus_address
        self.uid = uid
        self.cgroup = cgroup
        self.unique_name = ""
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> Self:
        if os.geteuid() != 0:
            import pytest

            pytest.skip("a client of another uid needs root to drop to that uid")
        extra = [str(self.cgroup)] if self.cgroup is not None else []
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.other_uid", str(self.uid), *extra,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=REPO, env={**os.environ, "LUD_BUS": self.bus_address},
        )
        me = await self.call("whoami")
        assert me["uid"] == self.uid, me
        self.unique_name = me["unique_name"]
        return self

    async def call(self, op: str, **args: Any) -> Any:
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await process.stdin.drain()
        async with asyncio.timeout(60):
            line = await process.stdout.readline()
        if not line:
            raise RuntimeError(f"uid {self.uid} client exited ({await process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            name, message = answer["error"], answer["message"]
            if name in _ERRORS:
                raise _ERRORS[name](message, answer.get("details"))
            if name.startswith("test-client:"):
                raise RuntimeError(f"{name}: {message}")
            raise BusError(name, message)
        return answer["ok"]

    async def leave(self) -> int:
        """Close stdin: the client disconnects from the bus and exits; its exit status."""
        process = self._process
        if process is None:
            return 0
        assert process.stdin is not None
        process.stdin.close()
        async with asyncio.timeout(30):
            status = await process.wait()
        self._process = None
        return status

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


if __name__ == "__main__":
    main()
