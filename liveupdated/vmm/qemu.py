"""One QEMU process on a guest-RAM memfd: its command line, its version, and the two
halves of the live update over QMP: save (stop, then the device state into the state
memfd) and load (-incoming defer, the state from the memfd, then cont)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .qmp import Qmp, QmpClosed, QmpError, reopen

MIN_VERSION = (8, 2)  # migration mode cpr-reboot and file: URIs with an offset
RAM_ID = "lu-ram"
STATE_OFFSET = 4096  # the adapter's header comes first, QEMU's migration stream after it
HEADER_MAGIC = b"liveupdated-qemu-state 1\n"
_POLL = 0.002


class AdapterError(Exception):
    """A failure the adapter explains in one line and exits on with `status`."""

    status = 1


class QemuUnavailable(AdapterError):
    status = 69  # EX_UNAVAILABLE


class StateRejected(AdapterError):
    status = 65  # EX_DATAERR


class RamMissing(AdapterError):
    status = 66  # EX_NOINPUT


class QemuFailed(AdapterError):
    status = 70  # EX_SOFTWARE


def parse_version(text: str) -> tuple[int, int, int]:
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise QemuUnavailable(f"cannot read a QEMU version from {text.strip()[:200]!r}")
    major, minor, micro = match.groups()
    return int(major), int(minor), int(micro or 0)


def check_version(command: Sequence[str]) -> tuple[int, int, int]:
    """QEMU's version, or QemuUnavailable when it cannot run or is older than 8.2."""
    try:
        result = subprocess.run([*command, "--version"], capture_output=True, text=True,
                                timeout=60, check=False)
    except OSError as exc:
        raise QemuUnavailable(f"cannot run QEMU ({' '.join(command)}): {exc}") from None
    if result.returncode != 0:
        raise QemuUnavailable(
            f"{' '.join(command)} --version exited with {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-300:]}")
    version = parse_version(result.stdout)
    if version[:2] < MIN_VERSION:
        raise QemuUnavailable(
            f"QEMU {'.'.join(map(str, version))} is too old: live update needs QEMU "
            f"{'.'.join(map(str, MIN_VERSION))} or later (migration mode cpr-reboot; "
            "Debian bookworm has 7.2, trixie and sid are new enough)")
    return version


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a size: {text!r} (say 64M, 2G, ...)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2).upper()]
    return int(match.group(1)) << shift


@dataclass
class Header:
    """What the adapter writes before QEMU's stream in the state memfd, once a save has
    completed: without it the memfd holds no state to continue from."""

    ram_size: int
    qemu: str
    stopped_at: float  # wall clock: the only clock that spans the kexec
    freeze_started_at: float | None = None
    saved_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = json.dumps({"ram_size": self.ram_size, "qemu": self.qemu,
                           "stopped_at": self.stopped_at,
                           "freeze_started_at": self.freeze_started_at,
                           "saved_ms": self.saved_ms, "extra": self.extra}).encode()
        data = HEADER_MAGIC + body + b"\n"
        if len(data) > STATE_OFFSET:
            raise ValueError("state header too long")
        return data.ljust(STATE_OFFSET, b"\0")

    @classmethod
    def read(cls, fd: int) -> Header | None:
        """The header of the state memfd `fd`, None when no completed save is recorded."""
        data = os.pread(fd, STATE_OFFSET, 0)
        if not data.startswith(HEADER_MAGIC):
            return None
        body = data[len(HEADER_MAGIC):].split(b"\n", 1)[0]
        try:
            fields = json.loads(body)
            return cls(int(fields["ram_size"]), str(fields["qemu"]),
                       float(fields["stopped_at"]), fields.get("freeze_started_at"),
                       float(fields.get("saved_ms", 0.0)), dict(fields.get("extra", {})))
        except (ValueError, KeyError, TypeError):
            return None

    def write(self, fd: int) -> None:
        os.pwrite(fd, self.encode(), 0)

    @staticmethod
    def clear(fd: int) -> None:
        """Mark the state memfd as holding nothing to continue from."""
        os.pwrite(fd, b"\0" * STATE_OFFSET, 0)


@dataclass
class QemuSpec:
    """How to run QEMU for one VM: the same arguments at every start."""

    command: list[str]  # the QEMU binary, or a wrapper and its arguments
    ram_size: int
    machine: str
    args: list[str]  # passed through verbatim (disks, serial, accel, ...)
    qmp_path: Path

    def argv(self, ram_fd: int, incoming: bool) -> list[str]:
        if self.ram_size % (1 << 20):
            raise ValueError("the RAM size must be a whole number of MiB")
        return [
            *self.command,
            "-object",
            f"memory-backend-file,id={RAM_ID},size={self.ram_size},share=on,"
            f"mem-path=/proc/self/fd/{ram_fd}",
            "-machine", f"{self.machine},memory-backend={RAM_ID}",
            "-m", f"{self.ram_size >> 20}M",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *(["-incoming", "defer"] if incoming else []),
            *self.args,
        ]


class Qemu:
    """A running QEMU process and its QMP connection."""

    def __init__(self, spec: QemuSpec, process: asyncio.subprocess.Process, qmp: Qmp,
                 stderr: deque[str], pump: asyncio.Task[None]) -> None:
        self.spec, self.process, self.qmp = spec, process, qmp
        self.stderr, self._pump = stderr, pump

    @classmethod
    async def start(cls, spec: QemuSpec, ram_fd: int, incoming: bool) -> Qemu:
        with contextlib.suppress(FileNotFoundError):
            spec.qmp_path.unlink()
        process = await asyncio.create_subprocess_exec(
            *spec.argv(ram_fd, incoming), pass_fds=[ram_fd], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        stderr: deque[str] = deque(maxlen=20)
        pump = asyncio.create_task(_pump(process, stderr))
        try:
            qmp = await Qmp.connect(str(spec.qmp_path), alive=lambda: process.returncode is None)
        except (QmpClosed, TimeoutError) as exc:
            await _end(process)
            await pump
            raise QemuFailed(f"QEMU did not start: {exc}: {' | '.join(stderr)}") from None
        return cls(spec, process, qmp, stderr, pump)

    def why(self) -> str:
        return " | ".join(self.stderr) or "no message from QEMU"

    async def status(self) -> str:
        return str((await self.qmp.execute("query-status"))["status"])

    async def version(self) -> str:
        v = (await self.qmp.execute("query-version"))["qemu"]
        return f"{v['major']}.{v['minor']}.{v['micro']}"

    async def _cpr_mode(self) -> None:
        try:
            await self.qmp.execute("migrate-set-parameters", {"mode": "cpr-reboot"})
            await self.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True}]})
        except QmpError as exc:
            raise QemuUnavailable(f"this QEMU cannot do a cpr-reboot migration: {exc}") from None

    async def save(self, state_fd: int) -> tuple[float, float]:
        """Stop the guest and write its device state into `state_fd` after the header;
        return (wall clock of the stop, milliseconds from stop to the state saved)."""
        await self._cpr_mode()
        Header.clear(state_fd)
        await self.qmp.execute("stop")
        stopped_at, t0 = time.time(), time.monotonic()
        await self._migrate("migrate", state_fd, os.O_WRONLY)
        return stopped_at, (time.monotonic() - t0) * 1000

    async def load(self, state_fd: int) -> None:
        """Load the device state from `state_fd` into this QEMU (started incoming);
        StateRejected, the guest never continued, when QEMU refuses it."""
        await self._cpr_mode()
        try:
            await self._migrate("migrate-incoming", state_fd, os.O_RDONLY)
        except QmpClosed:
            await asyncio.wait_for(self.process.wait(), 10)
            await self._pump
            raise StateRejected(f"QEMU exited while loading the saved state: {self.why()}"
                                ) from None

    async def _migrate(self, command: str, state_fd: int, flags: int) -> None:
        fd = reopen(state_fd, flags)
        try:
            added = await self.qmp.execute("add-fd", fds=[fd])
        finally:
            os.close(fd)
        fdset = int(added["fdset-id"])
        uri = f"file:/dev/fdset/{fdset},offset={STATE_OFFSET}"
        try:
            await self.qmp.execute(command, {"uri": uri})
            while True:
                info = await self.qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    reason = info.get("error-desc", status)
                    if command == "migrate":
                        raise QemuFailed(f"saving the device state failed: {reason}")
                    raise StateRejected(f"QEMU refused the saved state: {reason}; "
                                        f"{self.why()}")
                await asyncio.sleep(_POLL)
        finally:
            with contextlib.suppress(QmpError, QmpClosed):
                await self.qmp.execute("remove-fd", {"fdset-id": fdset})

    async def cont(self) -> float:
        """Continue the guest; the wall clock at which it runs."""
        await self.qmp.execute("cont")
        return time.time()

    async def quit(self) -> int:
        """End QEMU (quit over QMP, else kill it); its exit status."""
        with contextlib.suppress(QmpError, QmpClosed):
            await self.qmp.execute("quit")
        code = await _end(self.process)
        self.qmp.close()
        await self._pump
        return code


async def _pump(process: asyncio.subprocess.Process, lines: deque[str]) -> None:
    """QEMU's stderr: kept for error messages and passed on to ours (the journal)."""
    assert process.stderr is not None
    async for raw in process.stderr:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        os.write(2, f"<4>qemu: {line}\n".encode())


async def _end(process: asyncio.subprocess.Process, grace: float = 5.0) -> int:
    if process.returncode is None:
        try:
            return await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    return await process.wait()
