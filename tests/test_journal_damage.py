"""Journal damage at every frame, against a real daemon and fd store: no fd is lost.

A realistic journal (sessions, PreserveFd, PreserveFds, an UnpreserveFd, a Close) is
damaged at each frame boundary and inside each frame: cut there, a bit flipped in its
length or its payload, 64 bytes zeroed. After each, a daemon starts from the damaged
journal and the intact fd store, and every fd the store held is accounted for: handed
back byte-exact to its owner, held as Corrupted in its session, or quarantined. None is
closed. A damaged frame's original journal is kept beside the repaired one; a cut (which
reads as a whole, shorter journal) is found by the watermark, and each fd then is exactly
what the frames before the cut say: handed back if they hold it, else Corrupted in its
session or quarantined.

One test per kind of damage runs every frame of the journal the fixture built (as many
cases as it has frames, none skipped) and reports every frame that failed.
"""

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import Corrupted, LiveUpdateError
from liveupdated.core.names import session_path
from liveupdated.core.records import FdPreserved, FdReleased, Record, SessionCreated, SessionDropped
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
    records: list[list[Record]] = field(default_factory=list)  # of each frame


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
    found = journal_frames(state / "journal")
    frames = [(offset - 8, offset + length) for offset, length, _ in found]
    assert sorted(store.store) == sorted(content)
    mark = os.pread(store.own["@journal-mark"], 64, 0)
    return Built(state, dict(store.store), content, frames, mark,
                 [records for _, _, records in found])


def _before(records: list[list[Record]], frame: int) -> tuple[set[str], set[str]]:
    """(sessions, session/token fds) that the frames before `frame` leave held."""
    sessions: set[str] = set()
    held: set[str] = set()
    for record in (r for group in records[:frame] for r in group):
        match record:
            case SessionCreated():
                sessions.add(record.session)
            case SessionDropped():
                sessions.discard(record.session)
            case FdPreserved():
                held.add(f"{record.session}/{record.token}")
            case FdReleased():
                held.discard(f"{record.session}/{record.token}")
    return sessions, held


def _after_cut(base: Built, frame: int) -> dict[str, str]:
    """How each fd must come back after a cut at `frame`: "content" (handed back), "lost"
    (held by the frames kept, released by its owner later: its fd is gone, see ACCEPTED),
    "corrupted" (its record cut, its session kept) or "quarantined" (its session's records
    cut too)."""
    sessions, held = _before(base.records, frame)
    expected = {name: "content" for name in held & set(base.content)}
    expected |= {name: "lost" for name in held - set(base.content)}
    for name in set(base.content) - held:
        expected[name] = "corrupted" if name.split("/")[0] in sessions else "quarantined"
    return expected


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
KINDS = ("cut", "length", "payload", "zero")
# What a cut may show of each fd: an fd released by its owner, its release cut from the
# journal, is not in the store any more: reported lost (RetrieveFd says so) or forgotten,
# never handed out.
ACCEPTED = {"content": {"content"}, "lost": {"lost", "gone"}, "corrupted": {"corrupted"},
            "quarantined": {"quarantined"}}


def test_the_journal_is_a_realistic_one(built: tuple[Built, PrivateBus]) -> None:
    base = built[0]
    assert len(base.frames) >= 20
    kinds = {type(r).__name__ for group in base.records for r in group}
    assert {"SessionCreated", "FdPreserved", "FdReleased", "SessionDropped",
            "PhaseChanged"} <= kinds
    assert any(len(group) > 1 for group in base.records)  # a PreserveFds frame
    # The oracle of the cuts: every fd in the store is held by the whole journal.
    assert _after_cut(base, len(base.frames)) == dict.fromkeys(base.content, "content")
    assert set(_after_cut(base, 0).values()) == {"quarantined"}


@pytest.mark.parametrize("kind", KINDS)
async def test_damage_at_every_frame_loses_no_fd(
    built: tuple[Built, PrivateBus], tmp_path: Path, kind: str
) -> None:
    base, bus = built
    failures = []
    for frame in range(len(base.frames)):
        try:
            problems = await _damage_one(base, bus, tmp_path / f"frame-{frame}", kind, frame)
        except Exception as exc:  # one frame's failure must not hide the others'
            problems = [f"{type(exc).__name__}: {exc}"]
        failures += [f"{kind} at frame {frame}: {p}" for p in problems]
    assert not failures, f"{len(failures)} problems in {len(base.frames)} frames:\n" + (
        "\n".join(failures))


async def _damage_one(
    base: Built, bus: PrivateBus, root: Path, kind: str, frame: int
) -> list[str]:
    """Start a daemon on the journal damaged so at `frame`; what is wrong with what it
    hands back."""
    start, end = base.frames[frame]
    state = root / "state"
    shutil.copytree(base.state, state)
    journal = state / "journal"
    original = journal.read_bytes()
    assert original.startswith(MAGIC)
    journal.write_bytes(_damage(original, kind, start, end))
    store = Notifications()
    for name, fd in base.store.items():
        store.store[name] = os.dup(fd)
    store.own["@journal-mark"] = make_memfd(len(base.mark), base.mark)  # a copy: it changes
    log = (root / "daemon.log").open("ab")
    daemon = DaemonProcess(bus.address, state, "--backend", "simulated", log=log,
                           notifications=store)
    problems: list[str] = []
    try:
        daemon.start()
        store.settle()  # READY=1 may overtake store messages still queued in the daemon
        # The files, not their names: recovery may store a quarantined fd anew under a
        # name of its own.
        held = {_file(fd) for fd in store.store.values()}
        gone = sorted(name for name, fd in base.store.items() if _file(fd) not in held)
        if gone:
            problems.append(f"fds left the store: {gone}")
        async with await Client.connect(bus.address) as admin:
            accounted = await _account(admin)
        missing = sorted(set(base.content) - set(accounted))
        if missing:
            problems.append(f"{missing} not accounted for")
        for name, how in accounted.items():
            if name not in base.content:
                # Released by its owner (UnpreserveFd, Close), its release's record lost:
                # the journal says held, the fd is gone, and it is reported so.
                if name not in RELEASED or not (isinstance(how, str) and "lost" in how):
                    problems.append(f"{name} was released, yet is {how!r}")
            elif isinstance(how, bytes) and how != base.content[name]:
                problems.append(f"{name} came back as {how!r}")
        if kind == "cut":
            found = {name: "content" if isinstance(how, bytes) else
                     "lost" if "lost" in how else how for name, how in accounted.items()}
            expected = _after_cut(base, frame)
            problems += [f"{name} is {found.get(name, 'gone')}, the frames kept say {want}"
                         for name, want in sorted(expected.items())
                         if found.get(name, "gone") not in ACCEPTED[want]]
        elif not list(state.glob("journal.damaged-*")):
            problems.append("the damaged journal was not kept")
    finally:
        daemon.close()
        store.close()
        log.close()
    return problems


def _file(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


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
