"""Journal damage at every frame, against a real daemon and fd store: no fd is lost.

A realistic journal (sessions, PreserveFd, PreserveFds, an UnpreserveFd, a Close) is
damaged at each frame boundary and inside each frame: cut there, a bit flipped in its
length or its payload, 64 bytes zeroed. After each, a daemon starts from the damaged
journal and the intact fd store, and every fd the store held is accounted for: handed
back byte-exact to its owner, held as Corrupted in its session, or quarantined. None is
closed, and the damaged original is kept beside the repaired journal.
"""

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import Corrupted, LiveUpdateError
from liveupdated.core.names import session_path
from liveupdated.journal import MAGIC
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess, Notifications
from tests.conftest import make_memfd
from tests.rules_support import journal_frames


@dataclass
class Built:
    state: Path  # the undamaged state dir
    store: dict[str, int]  # the fd store as the daemon left it
    content: dict[str, bytes]  # by fd name
    frames: list[tuple[int, int]]  # (start of the frame's header, its end)
    mark: bytes  # the journal's watermark, which the daemon keeps in the fd store


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Built, PrivateBus]]:
    directory = tmp_path_factory.mktemp("damage")
    with PrivateBus(directory / "bus") as bus:
        yield _build(bus, directory), bus


def _build(bus: PrivateBus, directory: Path) -> Built:
    import asyncio

    store = Notifications()
    state = directory / "state"
    log = (directory / "build.log").open("ab")
    daemon = DaemonProcess(bus.address, state, "--backend", "simulated", log=log,
                           notifications=store).start()
    content: dict[str, bytes] = {}

    async def fill() -> None:
        async with await Client.connect(bus.address) as vmm:
            for i in range(6):
                name = f"vm-{i}"
                session = await vmm.create_session(name)
                fds = []
                for token in ("ram", "rom"):
                    data = f"{name}/{token}".encode()
                    fds.append(make_memfd(8192, data))
                    await session.preserve_fd(token, fds[-1], ["ram"] if token == "rom" else [])
                    content[f"{name}/{token}"] = data
                batch = [(f"dev{j}", make_memfd(4096, f"{name}/dev{j}".encode()), ["ram"])
                         for j in range(3)]
                await session.preserve_fds(batch)
                content.update({f"{name}/dev{j}": f"{name}/dev{j}".encode() for j in range(3)})
                if i == 2:
                    await session.unpreserve_fd("dev1")
                    del content[f"{name}/dev1"]
                if i == 4:
                    await session.close()
                    for key in [k for k in content if k.startswith(f"{name}/")]:
                        del content[key]
                if i == 1:
                    await session.delay_freeze(True)
                for fd in [*fds, *(fd for _, fd, _ in batch)]:
                    os.close(fd)
            await vmm.prepare()  # the sessions outlive their VMM from here on
        daemon.stop()

    asyncio.run(fill())
    log.close()
    frames = [(offset - 8, offset + length) for offset, length, _ in
              journal_frames(state / "journal")]
    assert sorted(store.store) == sorted(content)
    mark = os.pread(store.own["@journal-mark"], 64, 0)
    return Built(state, dict(store.store), content, frames, mark)


def _cases(frames: int) -> list[tuple[str, int]]:
    return [(kind, k) for k in range(frames) for kind in ("cut", "length", "payload", "zero")]


def _damage(data: bytes, kind: str, start: int, end: int) -> bytes:
    damaged = bytearray(data)
    if kind == "cut":
        return bytes(damaged[:start])
    if kind == "length":
        damaged[start + 1] ^= 0x01  # the length field's second byte
    elif kind == "payload":
        damaged[(start + 8 + end) // 2] ^= 0x40
    else:
        damaged[start : start + 64] = bytes(min(64, len(damaged) - start))
    return bytes(damaged)


RELEASED = {"vm-2/dev1", *(f"vm-4/{t}" for t in ("ram", "rom", "dev0", "dev1", "dev2"))}
FRAME_COUNT = 40  # at least as many as the built journal has (checked below)


def test_the_cases_cover_every_frame(built: tuple[Built, PrivateBus]) -> None:
    assert 20 <= len(built[0].frames) <= FRAME_COUNT


@pytest.mark.parametrize(("kind", "frame"), _cases(FRAME_COUNT))
async def test_damage_at_every_frame_loses_no_fd(
    built: tuple[Built, PrivateBus], tmp_path: Path, kind: str, frame: int
) -> None:
    base, bus = built
    if frame >= len(base.frames):
        pytest.skip(f"the journal has {len(base.frames)} frames")
    start, end = base.frames[frame]
    state = tmp_path / "state"
    shutil.copytree(base.state, state)
    journal = state / "journal"
    original = journal.read_bytes()
    assert original.startswith(MAGIC)
    journal.write_bytes(_damage(original, kind, start, end))
    store = Notifications()
    for name, fd in base.store.items():
        store.store[name] = os.dup(fd)
    store.own["@journal-mark"] = make_memfd(len(base.mark), base.mark)  # a copy: it changes
    log = (tmp_path / "daemon.log").open("ab")
    daemon = DaemonProcess(bus.address, state, "--backend", "simulated", log=log,
                           notifications=store)
    try:
        daemon.start()
        assert sorted(store.store) == sorted(base.store), "an fd left the store"
        async with await Client.connect(bus.address) as admin:
            accounted = await _account(admin)
        missing = sorted(set(base.content) - set(accounted))
        assert not missing, f"{kind} at frame {frame}: {missing} not accounted for"
        for name, how in accounted.items():
            if name not in base.content:
                # Released by its owner (UnpreserveFd, Close), its release's record lost:
                # the journal says held, the fd is gone, and it is reported so.
                assert name in RELEASED, (name, how)
                assert isinstance(how, str) and how.startswith("refused"), (name, how)
            elif isinstance(how, bytes):
                assert how == base.content[name]
        if kind != "cut" or frame == 0:
            assert list(state.glob("journal.damaged-*")) or kind == "cut"
    finally:
        daemon.close()
        store.close()
        log.close()


async def _account(admin: Client) -> dict[str, bytes | str]:
    """Every fd the daemon holds: its content if its session hands it out, else how it
    is kept ("corrupted" in its session, or "quarantined")."""
    found: dict[str, bytes | str] = {}
    if await admin.state() == "prepared":
        await admin.cancel()
    for info in await admin.list_sessions():
        session = SessionClient(admin, info.name, session_path(info.name))
        for fd_info in await session.list_fds():
            name = f"{info.name}/{fd_info.token}"
            try:
                fd = await session.retrieve_fd(fd_info.token)
            except Corrupted:
                found[name] = "corrupted"
                continue
            except LiveUpdateError as exc:
                found[name] = f"refused: {exc}"
                continue
            found[name] = os.pread(fd, 64, 0).rstrip(b"\0")
            os.close(fd)
    for q in await admin.list_quarantined():
        found[f"{q.session}/{q.token}"] = "quarantined"
    return found
