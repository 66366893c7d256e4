"""A VMM stand-in for the service tests, run inside the container by the installed venv's
python (/usr/lib/liveupdated/bin/python), through the client library only.

  vmm.py hold SESSION OUT  create SESSION, hand over a sparse 64 MiB memfd with scattered
                           data and a small sealed one that requires it, write their
                           fingerprints to OUT (JSON) and their files' (st_dev, st_ino) to
                           OUT.files, send READY=1 (run it as a Type=notify
                           unit) and stay connected until SIGTERM
  vmm.py show SESSION      print JSON: the state, ListSessions, the session's ListFds and,
                           where RetrieveFd is allowed (states normal and updated, after
                           RetrieveSession in the latter), the fingerprint of every fd and
                           (under "files") its (st_dev, st_ino): the same after the update
                           only if the very file came back, nothing copied
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import sdnotify

from liveupdated.client import Client, SessionClient
from liveupdated.core.names import session_path
from liveupdated.demo import fingerprint

MIB = 1 << 20
RAM_SIZE = 64 * MIB
RAM_POSITION = 3 * 4096  # a file position that must survive too
STATE_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def guest_ram(seed: int = 42) -> int:
    """64 MiB, mostly holes: 64 KiB of random data at scattered offsets and in the last page."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM_SIZE)
    rng = random.Random(seed)
    for slot in sorted(rng.sample(range(1, RAM_SIZE // MIB - 1), 9)):
        os.pwrite(fd, rng.randbytes(64 << 10), slot * MIB + rng.randrange(0, 16) * 4096)
    os.pwrite(fd, b"end of guest memory", RAM_SIZE - 4096)
    os.lseek(fd, RAM_POSITION, os.SEEK_SET)
    return fd


def vm_state() -> int:
    """A few KiB of device state, sealed against any change."""
    fd = os.memfd_create("vm-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, json.dumps({"vcpus": 4, "devices": ["virtio-net", "virtio-blk"]}).encode())
    os.write(fd, bytes(range(256)) * 16)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, STATE_SEALS)
    return fd


def facts(fd: int) -> dict[str, Any]:
    """demo.fingerprint(): size, seals, name, position, data extents and their sha256."""
    return dataclasses.asdict(fingerprint(fd))


def file_of(fd: int) -> list[int]:
    """Which file: (st_dev, st_ino) of the memfd."""
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino]


async def hold(name: str, out: Path) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ram, state = guest_ram(), vm_state()
    async with await Client.connect("system") as client:
        session = await client.create_session(name)
        await session.preserve_fd("guest-ram", ram)
        await session.preserve_fd("vm-state", state, requires=["guest-ram"])
        prints = {"guest-ram": facts(ram), "vm-state": facts(state)}
        files = {"guest-ram": file_of(ram), "vm-state": file_of(state)}
        Path(f"{out}.files").write_text(json.dumps(files))
        partial = out.with_suffix(".partial")
        partial.write_text(json.dumps(prints))
        partial.rename(out)
        sdnotify.SystemdNotifier().notify("READY=1")
        await stop.wait()


async def show(name: str) -> None:
    async with await Client.connect("system") as client:
        state = await client.state()
        if state == "updated":
            session = await client.retrieve_session(name)
        else:
            session = SessionClient(client, name, session_path(name))
        listed = await session.list_fds()
        prints = {}
        files = {}
        for entry in listed if state in ("normal", "updated") else []:
            fd = await session.retrieve_fd(entry.token)
            try:
                prints[entry.token] = facts(fd)
                files[entry.token] = file_of(fd)
            finally:
                os.close(fd)
        report = {
            "state": state,
            "sessions": [dataclasses.asdict(s) for s in await client.list_sessions()],
            "fds": [dataclasses.asdict(f) for f in listed],
            "fingerprints": prints,
            "files": files,
        }
    print(json.dumps(report))


async def finish_race(names: list[str]) -> None:
    """After the reboot: each session's Session.Finish and the host's Manager.Finish
    pipelined on one connection, in this order; prints each outcome (null: done)."""
    async with await Client.connect("system") as client:
        sessions = [await client.retrieve_session(name) for name in names]
        calls = [sessions[0].finish(), client.finish(), *(s.finish() for s in sessions[1:])]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        report = {
            "outcomes": [None if o is None else f"{type(o).__name__}: {o}" for o in outcomes],
            "state": await client.state(),
            "sessions": [s.name for s in await client.list_sessions()],
        }
    print(json.dumps(report))


def main(argv: list[str]) -> None:
    match argv:
        case ["hold", name, out]:
            asyncio.run(hold(name, Path(out)))
        case ["show", name]:
            asyncio.run(show(name))
        case ["finish-race", *names] if names:
            asyncio.run(finish_race(names))
        case _:
            sys.exit(f"usage: {sys.argv[0]} hold SESSION OUT | show SESSION"
                     " | finish-race SESSION...")


if __name__ == "__main__":
    main(sys.argv[1:])
