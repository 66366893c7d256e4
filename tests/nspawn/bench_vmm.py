"""The VMM of `make bench-nspawn` (tests/nspawn/bench_fdstore.py), run inside the sid
container by the installed venv's python as a template unit, bench-vmm@NAME.service, one
bus connection each, through the client library only.

  bench_vmm.py run NAME  the unit's ExecStart. By the bench's config.json and the
                         daemon's state:
                         - updated: RetrieveSession, then RetrieveFd of each token one
                           after the other, each reply timed; READY=1; report written;
                           then, once the bench opens the check gate (a shared flock it
                           holds until every VMM has its fds), every byte of every fd
                           checked against what was preserved; a second report written
                         - normal, mode "hold": CreateSession, FDS memfds of SIZE bytes
                           filled with data, wait at the barrier (a shared flock the bench
                           holds exclusively), PreserveFd of each, each call timed; report
                           written; READY=1
                         - otherwise (the bare run's units, holding nothing): READY=1
                         and then stays (holding what it has, as a VMM does) until SIGTERM
  bench_vmm.py update    Prepare, then Freeze and Reboot() timed; the times written first
  bench_vmm.py softreboot  the time written, then exec `systemctl soft-reboot`

Times are CLOCK_MONOTONIC (time.monotonic()), which the container shares with the host
and with systemd's *TimestampMonotonic properties.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import sdnotify

from liveupdated.client import Client

DIR = Path("/var/tmp/liveupdated-bench")
CONFIG = DIR / "config.json"
BARRIER = DIR / "barrier"
CHECK_GATE = DIR / "check-gate"  # held by the bench until every VMM has its fds back
ARMED = DIR / "armed"  # NAME: created just before the VMM takes the barrier
REPORTS = DIR / "reports"  # NAME.PHASE.json
UPDATE = DIR / "update.json"
SOFT_REBOOT = DIR / "softreboot.json"
CHUNK = 64 << 10


def tokens(count: int) -> list[str]:
    return [f"mem{i}" for i in range(count)]


def content(name: str, token: str, size: int) -> bytes:
    """The data of one memfd: a seeded 64 KiB block, each 64 KiB chunk stamped with its
    index, so that a chunk moved or swapped is caught as surely as a flipped byte."""
    seed = int.from_bytes(hashlib.sha256(f"{name}/{token}".encode()).digest()[:8], "little")
    block = random.Random(seed).randbytes(CHUNK)
    chunks = (i.to_bytes(8, "little") + block[8:] for i in range(-(-size // CHUNK)))
    return b"".join(chunks)[:size]


def make_memfd(name: str, token: str, size: int) -> int:
    fd = os.memfd_create(f"bench-{token}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    data = content(name, token, size)
    view = memoryview(data)
    written = 0
    while written < size:
        written += os.pwrite(fd, view[written:], written)
    return fd


def differs(name: str, token: str, size: int, fd: int) -> str:
    """'' if fd holds exactly what was preserved, else what is wrong."""
    actual = os.fstat(fd).st_size
    if actual != size:
        return f"{token}: {actual} bytes, not {size}"
    want = content(name, token, size)
    step = 1 << 20
    for offset in range(0, size, step):
        got = os.pread(fd, min(step, size - offset), offset)
        if got != want[offset : offset + step]:
            return f"{token}: bytes differ in [{offset}, {offset + len(got)})"
    return ""


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    partial.rename(path)


async def retrieve(client: Client, name: str, count: int, size: int,
                   report: dict[str, Any]) -> list[int]:
    """After the update: every fd back, timed; READY=1; the bytes checked at the gate."""
    held: list[int] = []
    report["phase"] = "retrieve"
    report["asked"] = time.monotonic()
    session = await client.retrieve_session(name)
    report["session"] = time.monotonic()
    calls = []
    for token in tokens(count):
        sent = time.monotonic()
        fd = await session.retrieve_fd(token)
        calls.append((sent, time.monotonic()))
        held.append(fd)
    report["calls"] = calls
    sdnotify.SystemdNotifier().notify("READY=1")
    report["ready"] = time.monotonic()
    write_json(REPORTS / f"{name}.retrieve.json", report)
    # The checks wait until every VMM has its fds: one VMM's reading its 32 MiB
    # must not slow another's RetrieveFd on these 2 cores.
    with open(CHECK_GATE) as gate:
        fcntl.flock(gate, fcntl.LOCK_SH)
    problems = [p for t, fd in zip(tokens(count), held, strict=True)
                if (p := differs(name, t, size, fd))]
    report["phase"] = "checked"
    report["checked"] = len(held)
    report["problems"] = problems
    report["bytes"] = count * size
    return held


async def run(name: str) -> None:
    started = time.monotonic()
    config = json.loads(CONFIG.read_text())
    count, size = int(config["fds"]), int(config["size"])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    notifier = sdnotify.SystemdNotifier()
    held: list[int] = []
    report: dict[str, Any] = {"name": name, "started": started, "pid": os.getpid()}
    async with await Client.connect("system") as client:
        report["connected"] = time.monotonic()
        state = await client.state()  # the first call: it waits for the daemon's READY
        report["state"], report["answered"] = state, time.monotonic()
        if state == "updated":
            held = await retrieve(client, name, count, size, report)
        elif config["mode"] == "hold":
            report["phase"] = "preserve"
            session = await client.create_session(name)
            held = [make_memfd(name, t, size) for t in tokens(count)]
            with open(BARRIER) as barrier:
                (ARMED / name).touch()
                fcntl.flock(barrier, fcntl.LOCK_SH)  # until the bench lets every VMM go
            calls = []
            for token, fd in zip(tokens(count), held, strict=True):
                sent = time.monotonic()
                await session.preserve_fd(token, fd)
                calls.append((sent, time.monotonic()))
            report["calls"] = calls
            notifier.notify("READY=1")
        else:
            report["phase"] = "bare"
            notifier.notify("READY=1")
        report.setdefault("ready", time.monotonic())
        write_json(REPORTS / f"{name}.{report['phase']}.json", report)
        await stop.wait()
    for fd in held:
        os.close(fd)


async def update() -> None:
    async with await Client.connect("system") as client:
        await client.prepare()
        times: dict[str, float] = {"freeze_call": time.monotonic()}
        await client.freeze()
        times["freeze_reply"] = time.monotonic()
        times["reboot_call"] = time.monotonic()
        write_json(UPDATE, times)  # before the call: the reply may come too late to write
        await client.reboot()
        times["reboot_reply"] = time.monotonic()
        write_json(UPDATE, times)


def main(argv: list[str]) -> None:
    match argv:
        case ["run", name]:
            asyncio.run(run(name))
        case ["update"]:
            asyncio.run(update())
        case ["softreboot"]:
            write_json(SOFT_REBOOT, {"soft_reboot_call": time.monotonic()})
            os.execvp("systemctl", ["systemctl", "soft-reboot"])
        case _:
            sys.exit(f"usage: {sys.argv[0]} run NAME | update | softreboot")


if __name__ == "__main__":
    main(sys.argv[1:])
