"""The journal: framing, replay, torn and corrupt tails, group commit, compaction."""

import asyncio
import os
import signal
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from liveupdated.core.records import (
    FdPreserved,
    FdReleased,
    FreezeDelaySet,
    PhaseChanged,
    Record,
    SessionCreated,
    SessionDropped,
    SessionReady,
)
from liveupdated.journal import (
    MAGIC,
    MAX_FRAME_READ_BYTES,
    MAX_RECORD_BYTES,
    Damage,
    Journal,
    decode,
    encode,
)

RECORDS: list[Record] = [
    SessionCreated(session="vm", uid=1000, unit="vmm.service", client=":1.5"),
    FdPreserved(session="vm", token="ram", kind="memfd", requires=(), size=1 << 30,
                name="guest", seals=6),
    FdPreserved(session="vm", token="kvm", kind="memfd", requires=("ram",), size=0,
                name="k", seals=0),
    SessionDropped(session="vm", reason="closed"),
]


def written(path: Path, records: list[Record]) -> bytes:
    journal, _, _ = Journal.open(path)
    journal.commit_now(records)
    journal.close()
    return path.read_bytes()


def test_records_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    written(path, RECORDS)
    journal, records, damages = Journal.open(path)
    journal.close()
    assert records == RECORDS
    assert damages == []


def test_a_cut_at_every_byte_replays_to_a_valid_prefix_and_is_trimmed(tmp_path: Path) -> None:
    data = MAGIC + encode(RECORDS)
    ends = [len(MAGIC) + len(encode(RECORDS[:n])) for n in range(len(RECORDS) + 1)]
    for cut in range(len(MAGIC), len(data) + 1):
        path = tmp_path / f"j{cut}"
        path.write_bytes(data[:cut])
        journal, records, damages = Journal.open(path)
        journal.close()
        whole = sum(1 for end in ends[1:] if end <= cut)
        assert records == RECORDS[:whole]
        assert (damages == []) == (cut in ends)
        assert all(d.cut for d in damages)
        assert path.stat().st_size == ends[whole]


def test_a_decision_is_one_frame_that_a_cut_keeps_whole_or_drops() -> None:
    """The records of one decision (a PreserveFds of several fds) are one frame: a cut
    anywhere in it replays none of them, and what came before survives."""
    before, decision = encode(RECORDS[:1]), encode(RECORDS[1:3], whole=True)
    assert struct.unpack_from("<I", decision)[0] + 8 == len(decision)  # one frame
    data = MAGIC + before + decision
    for cut in range(len(MAGIC + before), len(data) + 1):
        records, _, end = decode(data[:cut])
        assert records == (RECORDS[:3] if cut == len(data) else RECORDS[:1])
        assert end == (len(data) if cut == len(data) else len(MAGIC + before))


def test_a_decision_too_large_for_one_frame_is_written_a_frame_per_record() -> None:
    many = [FdPreserved(session="vm", token=f"t{i}", kind="memfd", requires=("x" * 60,) * 50,
                        size=i, name="n", seals=0) for i in range(400)]
    data = encode(many, whole=True)
    assert len(data) > MAX_RECORD_BYTES
    assert struct.unpack_from("<I", data)[0] == len(encode(many[:1])) - 8
    assert decode(MAGIC + data)[0] == many


def test_a_flipped_bit_in_the_middle_skips_only_that_record(tmp_path: Path) -> None:
    data = bytearray(MAGIC + encode(RECORDS))
    second = len(MAGIC) + len(encode(RECORDS[:1]))
    data[second + 12] ^= 0x01  # inside the second record's payload
    path = tmp_path / "journal"
    path.write_bytes(bytes(data))
    journal, records, damages = Journal.open(path)
    journal.close()
    assert records == [RECORDS[0], *RECORDS[2:]]
    (damage,) = damages
    assert (damage.offset, damage.reason, damage.cut) == (second, "checksum mismatch", False)
    # The damaged original is kept aside; the journal itself holds only valid frames now,
    # so that appends never follow garbage.
    assert damage.quarantine is not None
    assert damage.quarantine.read_bytes() == bytes(data)
    assert path.read_bytes() == MAGIC + encode(RECORDS[:1]) + encode(RECORDS[2:])


def test_a_flipped_bit_in_the_last_record_cuts_it(tmp_path: Path) -> None:
    data = bytearray(MAGIC + encode(RECORDS))
    last = len(MAGIC) + len(encode(RECORDS[:-1]))
    data[-3] ^= 0x10
    path = tmp_path / "journal"
    path.write_bytes(bytes(data))
    journal, records, damages = Journal.open(path)
    journal.close()
    assert records == RECORDS[:-1]
    assert [(d.offset, d.cut) for d in damages] == [(last, True)]
    assert path.stat().st_size == last


def test_a_bad_header_keeps_the_frames_after_it(tmp_path: Path) -> None:
    """It used to start an empty journal, discarding every record: frames are found
    after whatever stands in the header's place, and the original is quarantined."""
    path = tmp_path / "journal"
    path.write_bytes(b"garbage" + encode(RECORDS))
    journal, records, damages = Journal.open(path)
    journal.close()
    assert records == RECORDS
    assert [(d.offset, d.length, d.cut) for d in damages] == [(0, 7, False)]
    assert path.read_bytes() == MAGIC + encode(RECORDS)
    assert damages[0].quarantine is not None
    assert damages[0].quarantine.read_bytes() == b"garbage" + encode(RECORDS)


def test_decode_rejects_an_implausible_length() -> None:
    records, damages, end = decode(MAGIC + b"\xff\xff\xff\x7f\x00\x00\x00\x00")
    assert (records, end) == ([], len(MAGIC))
    assert "length" in damages[0].reason


async def test_concurrent_commits_share_fsyncs(tmp_path: Path) -> None:
    journal, _, _ = Journal.open(tmp_path / "journal")
    batches = [[SessionCreated(session=f"s{i}", uid=0, unit="", client=":1.1")]
               for i in range(50)]
    await asyncio.gather(*(journal.commit(b) for b in batches))
    journal.close()
    assert journal.commits == 50
    assert journal.fsyncs < 50
    _, records, damages = Journal.open(tmp_path / "journal")
    assert damages == []
    assert sorted(r.session for r in records) == sorted(f"s{i}" for i in range(50))  # type: ignore[union-attr]


async def test_compaction_replaces_the_journal_with_the_live_state(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal, _, _ = Journal.open(path)
    journal.commit_now(RECORDS)
    await journal.compact(lambda: RECORDS[:1])
    journal.commit_now(RECORDS[1:2])
    journal.close()
    _, records, damages = Journal.open(path)
    assert records == RECORDS[:2]
    assert damages == []
    assert not (tmp_path / "journal.new").exists()
    assert os.listdir(tmp_path) == ["journal"]


async def test_enqueued_records_keep_their_order_and_any_flush_makes_them_durable(
    tmp_path: Path,
) -> None:
    journal, _, _ = Journal.open(tmp_path / "journal")
    first = [SessionCreated(session="first", uid=0, unit="", client=":1.1")]
    second = [SessionCreated(session="second", uid=0, unit="", client=":1.1")]
    journal.enqueue(first)  # decided now, made durable by whoever flushes next
    # The commit starts a batch holding both; the flush then finds nothing pending and
    # must wait for that batch rather than return early or wait forever.
    await asyncio.wait_for(asyncio.gather(journal.commit(second), journal.flush()), 10)
    journal.close()
    _, records, _ = Journal.open(tmp_path / "journal")
    assert records == [*first, *second]


def damages_around(tmp_path: Path, payload: bytes) -> list[tuple[bool, bool]]:
    """Replay a journal with a well-framed `payload` after its first record: the records
    must all come back, and (cut?, "unreadable record"?) of each damaged frame is returned."""
    frame = struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    path = tmp_path / "journal"
    path.write_bytes(MAGIC + encode(RECORDS[:1]) + frame + encode(RECORDS[1:]))
    journal, records, damages = Journal.open(path)
    journal.close()
    assert records == RECORDS
    return [(d.cut, d.reason.startswith("unreadable record")) for d in damages]


def test_a_well_framed_record_that_does_not_parse_is_skipped(tmp_path: Path) -> None:
    assert damages_around(tmp_path, b'{"type": "no_such_record"}') == [(False, True)]


def test_a_frame_holding_two_records_is_skipped_not_read_as_two(tmp_path: Path) -> None:
    """Frames are parsed a chunk at a time as one JSON array: a payload `{...},{...}` must
    not pass for two frames."""
    two = encode(RECORDS[:1])[8:] + b"," + encode(RECORDS[3:])[8:]  # payloads, unframed
    assert damages_around(tmp_path, two) == [(False, True)]


async def test_compaction_waits_for_the_write_in_flight_and_keeps_later_records(
    tmp_path: Path,
) -> None:
    """The snapshot covers what was enqueued before it (dropped from the queue, never
    written twice); what is decided during the compaction lands in the new file."""
    path = tmp_path / "journal"
    journal, _, _ = Journal.open(path)
    state: list[Record] = []  # the core: records are applied, then enqueued

    def decide(records: list[Record]) -> None:
        state.extend(records)
        journal.enqueue(records)

    decide(RECORDS[:1])  # its write is in flight when the compaction starts
    decide(RECORDS[1:2])  # pending behind it, and covered by the snapshot
    loop = asyncio.get_running_loop()

    def snapshot() -> list[Record]:
        loop.call_soon(decide, RECORDS[2:3])  # decided while the new file is written
        return list(state)

    await asyncio.wait_for(journal.compact(snapshot), 10)
    await asyncio.wait_for(journal.flush(), 10)
    await journal.aclose()
    _, records, damages = Journal.open(path)
    assert records == RECORDS[:3]
    assert damages == []


async def test_a_failed_write_fails_every_waiting_flush(tmp_path: Path) -> None:
    journal, _, _ = Journal.open(tmp_path / "journal")
    journal.close()  # every write now fails with EBADF
    journal.enqueue(RECORDS[:1])
    journal.enqueue(RECORDS[1:2])
    for _ in range(2):
        with pytest.raises(OSError):
            await asyncio.wait_for(journal.flush(), 10)


async def test_a_flush_during_compaction_returns_once_the_new_file_holds_the_state(
    tmp_path: Path,
) -> None:
    """Records dropped from the queue because the snapshot covers them are durable only
    when the new file is in place: a flush in between must wait for it."""
    path = tmp_path / "journal"
    journal, _, _ = Journal.open(path)
    await journal.commit(RECORDS[:1])
    state: list[Record] = list(RECORDS[:1])
    state.extend(RECORDS[1:2])
    journal.enqueue(RECORDS[1:2])  # pending, then covered by the snapshot
    loop = asyncio.get_running_loop()
    seen: list[list[Record]] = []

    async def flush_and_look() -> None:
        await journal.flush()
        seen.append(decode(path.read_bytes())[0])

    flushes: list[asyncio.Task[None]] = []

    def snapshot() -> list[Record]:
        flushes.append(loop.create_task(flush_and_look()))  # runs while the file is swapped
        return list(state)

    await journal.compact(snapshot)  # at once, so that RECORDS[1:2] is still queued
    await asyncio.wait_for(flushes[0], 10)
    assert seen == [RECORDS[:2]]
    await journal.aclose()


async def test_closing_writes_what_is_enqueued_and_nothing_after(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal, _, _ = Journal.open(path)
    journal.enqueue(RECORDS[:1])
    journal.enqueue(RECORDS[1:2])
    await asyncio.wait_for(journal.aclose(), 10)
    journal.enqueue(RECORDS[2:3])  # after close: never written, never a write to a stale fd
    _, records, damages = Journal.open(path)
    assert records == RECORDS[:2]
    assert damages == []


async def test_a_write_that_cannot_start_fails_the_flush_rather_than_hanging(
    tmp_path: Path,
) -> None:
    journal, _, _ = Journal.open(tmp_path / "journal")
    loop = asyncio.get_running_loop()
    gone = ThreadPoolExecutor()
    gone.shutdown()
    loop.set_default_executor(gone)  # run_in_executor now raises RuntimeError
    try:
        journal.enqueue(RECORDS[:1])
        with pytest.raises(RuntimeError, match="shutdown"):
            async with asyncio.timeout(10):  # in this task: the flush itself starts the write
                await journal.flush()
    finally:
        loop.set_default_executor(ThreadPoolExecutor())
    journal.close()


# --- Damage anywhere: replay keeps every frame it did not touch -----------------------


def decisions() -> list[list[Record]]:
    """25 decisions as a daemon journals them: sessions created, fds preserved one at a
    time or several in one decision (one frame), freeze delays, releases, phases."""
    out: list[list[Record]] = []
    for i in range(25):
        vm = f"vm-{i // 5}"
        match i % 5:
            case 0:
                out.append([SessionCreated(session=vm, uid=1000 + i, unit=f"vmm@{i}.service",
                                           client=f":1.{i}")])
            case 1:
                out.append([FdPreserved(session=vm, token="ram", kind="memfd", requires=(),
                                        size=(i + 1) << 30, name="guest-ram", seals=15)])
            case 2:
                out.append([FdPreserved(session=vm, token=f"dev{n}", kind="memfd",
                                        requires=("ram",), size=4096 * n, name=f"dev{n}",
                                        seals=0) for n in range(3)])
            case 3:
                out.append([FreezeDelaySet(session=vm, enabled=True), SessionReady(session=vm)])
            case _:
                out.append([FdReleased(session=vm, token="dev0", reason="unpreserved"),
                            PhaseChanged(old="normal", new="normal", at_usec=i)])
    return out


class Image:
    """A journal image of `decisions()`, a frame per decision, and where each frame is."""

    def __init__(self) -> None:
        self.groups = decisions()
        frames = [encode(group, whole=True) for group in self.groups]
        self.spans: list[tuple[int, int]] = []
        offset = len(MAGIC)
        for frame in frames:
            assert struct.unpack_from("<I", frame)[0] + 8 == len(frame)  # one frame each
            self.spans.append((offset, offset + len(frame)))
            offset += len(frame)
        self.data = MAGIC + b"".join(frames)

    def units(self) -> list[tuple[int, int]]:
        """The header's span, then each frame's."""
        return [(0, len(MAGIC)), *self.spans]

    def points(self) -> list[int]:
        """Every frame boundary, and offsets inside the header and inside every frame:
        in its length field, its crc, at its payload's first byte, middle and last."""
        points = {0, 1, 4, 7, len(self.data)}
        for start, end in self.spans:
            payload = start + 8
            points |= {start, start + 1, start + 3, start + 5, payload,
                       (payload + end) // 2, end - 1}
        return sorted(points)

    def expected(self, damaged: bytes) -> tuple[list[Record], Damage | None]:
        """The records of every frame `damaged` holds unchanged, and the one damaged
        region replay must report: from the first changed unit (header or frame) to the
        next unchanged frame, or cut at the end if there is none. A journal cut at a
        frame boundary is whole; cut inside the header, even to nothing, it is not."""
        records: list[Record] = []
        first: int | None = None
        until: int | None = None
        for number, (start, end) in enumerate(self.units()):
            if number > 0 and start >= len(damaged):
                break  # cut off whole: not written yet, rather than damaged
            intact = damaged[start:end] == self.data[start:end]
            if intact and number > 0:
                records += self.groups[number - 1]
            if not intact and first is None:
                first = start
            if intact and first is not None and until is None:
                until = start
        if first is None:
            return records, None
        cut = until is None
        end = len(damaged) if until is None else until
        return records, Damage(first, end - first, "", cut=cut)


def check_replay(tmp_path: Path, image: Image, damaged: bytes, case: str) -> None:
    """Replay and reopen `damaged` as described in the module's promises: see the test
    functions below."""
    records, damage = image.expected(damaged)
    got, damages, _ = decode(damaged)
    assert got == records, case
    if damage is None:
        assert damages == [], case
    else:
        (found,) = damages
        assert (found.offset, found.length, found.cut) == (
            damage.offset, damage.length, damage.cut), case
        assert found.reason, case
    directory = tmp_path / case
    directory.mkdir()
    path = directory / "journal"
    path.write_bytes(damaged)
    journal, reopened, damages = Journal.open(path)
    journal.commit_now([SessionDropped(session="after", reason="appended")])
    journal.close()
    assert reopened == records, case
    kept = sorted(directory.glob("journal.damaged-*"))
    if damage is None:
        assert kept == [], case
    else:
        # The damaged original is kept, byte for byte, where the damage report says.
        assert [d.quarantine for d in damages] == kept, case
        assert kept[0].read_bytes() == damaged, case
        assert kept[0].stat().st_mode & 0o777 == 0o600, case
    # The repaired journal is clean, and what is appended to it is read back after it.
    again, damages, _ = decode(path.read_bytes())
    assert damages == [], case
    assert again == [*records, SessionDropped(session="after", reason="appended")], case


def test_a_cut_anywhere_keeps_every_whole_frame_and_quarantines_the_rest(
    tmp_path: Path,
) -> None:
    image = Image()
    for point in image.points():
        check_replay(tmp_path, image, image.data[:point], f"cut-{point}")


def test_a_flipped_bit_anywhere_loses_only_its_own_frame(tmp_path: Path) -> None:
    image = Image()
    for point in image.points()[:-1]:  # the last is the end of the file
        for bit in (0, 7):
            damaged = bytearray(image.data)
            damaged[point] ^= 1 << bit
            check_replay(tmp_path, image, bytes(damaged), f"flip-{point}-{bit}")


def test_zeroes_anywhere_lose_only_the_frames_they_touch(tmp_path: Path) -> None:
    image = Image()
    for point in image.points()[:-1]:
        damaged = bytearray(image.data)
        damaged[point : point + 64] = bytes(len(damaged[point : point + 64]))
        check_replay(tmp_path, image, bytes(damaged), f"zero-{point}")


def test_a_flipped_header_bit_keeps_every_record(tmp_path: Path) -> None:
    image = Image()
    damaged = bytearray(image.data)
    damaged[2] ^= 0x04
    path = tmp_path / "journal"
    path.write_bytes(bytes(damaged))
    journal, records, damages = Journal.open(path)
    journal.close()
    assert records == [r for group in image.groups for r in group]
    assert [(d.offset, d.length, d.cut) for d in damages] == [(0, len(MAGIC), False)]
    assert path.read_bytes() == image.data  # repaired: the header is whole again


def test_a_damaged_length_field_does_not_skip_the_next_frame() -> None:
    """A length grown by exactly the next frame's size delimits on a valid frame: replay
    must still resynchronise from the damaged frame's start, not from where its length
    points, or the frame in between would be lost with it."""
    image = Image()
    (first, second), (_, third) = image.spans[3], image.spans[4]
    damaged = bytearray(image.data)
    struct.pack_into("<I", damaged, first, second - first - 8 + (third - second))
    records, damages, _ = decode(bytes(damaged))
    assert records == [r for n, group in enumerate(image.groups) if n != 3 for r in group]
    assert [(d.offset, d.length, d.cut) for d in damages] == [(first, second - first, False)]


def big_frame() -> tuple[list[Record], bytes]:
    """A valid frame of 1.3 MB, as a version with a larger writer's bound could write."""
    group: list[Record] = [
        SessionCreated(session=f"s{i}", uid=i, unit="u" * 1000, client=":1.1")
        for i in range(1300)
    ]
    payload = b"[" + b",".join(encode([r])[8:] for r in group) + b"]"
    assert MAX_RECORD_BYTES < len(payload) < MAX_FRAME_READ_BYTES
    return group, struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def test_a_frame_over_the_writers_bound_is_read_not_cut(tmp_path: Path) -> None:
    group, frame = big_frame()
    path = tmp_path / "journal"
    path.write_bytes(MAGIC + encode(RECORDS[:1]) + frame + encode(RECORDS[1:]))
    journal, records, damages = Journal.open(path)
    journal.close()
    assert records == [RECORDS[0], *group, *RECORDS[1:]]
    assert damages == []
    assert os.listdir(tmp_path) == ["journal"]  # nothing to repair, nothing quarantined


def test_a_record_over_the_writers_bound_is_refused_at_encode_time() -> None:
    huge = SessionCreated(session="s", uid=0, unit="u" * MAX_RECORD_BYTES, client=":1.1")
    with pytest.raises(ValueError, match="bound"):
        encode([huge])
    with pytest.raises(ValueError, match="bound"):
        encode([RECORDS[0], huge], whole=True)  # too large whole, and alone too


def test_an_undamaged_journal_is_opened_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    written(path, RECORDS)
    inode = path.stat().st_ino
    journal, _, _ = Journal.open(path)
    journal.close()
    assert path.stat().st_ino == inode  # not rewritten
    assert os.listdir(tmp_path) == ["journal"]


async def test_size_tracks_the_file_and_compaction_by_size_resets_it(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal, _, _ = Journal.open(path)
    assert journal.size == len(MAGIC)
    live: dict[str, Record] = {}  # the state: the last record of each session
    for i in range(2000):
        record = SessionCreated(session=f"s{i % 20}", uid=i, unit="vmm.service",
                                client=":1.1")
        live[record.session] = record
        journal.enqueue([record])
        if i % 100 == 99:  # a flush per 100 decisions: group commit, as on a busy host
            await journal.flush()
    assert journal.size == path.stat().st_size
    limit = journal.size - 1
    assert not journal.needs_compaction(journal.size)
    assert journal.needs_compaction(limit)
    await journal.compact(lambda: list(live.values()))  # as the service does when due
    assert journal.size == path.stat().st_size == len(MAGIC + encode(live.values()))
    assert not journal.needs_compaction(limit)  # not due now
    await journal.commit(RECORDS[:1])
    assert journal.size == path.stat().st_size
    await journal.aclose()
    _, records, damages = Journal.open(path)
    assert records == [*live.values(), RECORDS[0]]
    assert damages == []


async def test_a_live_state_over_the_limit_is_not_compacted_after_every_flush(
    tmp_path: Path,
) -> None:
    """Compaction is due again only once the journal doubled what the last one left, so
    that its cost stays proportional to what was appended."""
    journal, _, _ = Journal.open(tmp_path / "journal")
    state = [SessionCreated(session=f"s{i}", uid=i, unit="u" * 100, client=":1.1")
             for i in range(100)]
    await journal.commit(state)
    await journal.compact(lambda: state)
    left = journal.size
    limit = left // 4  # the live state alone passes it
    assert not journal.needs_compaction(limit)
    while journal.size <= 2 * left:
        assert not journal.needs_compaction(limit)
        await journal.commit(state[:1])
    assert journal.needs_compaction(limit)
    await journal.aclose()
    assert not journal.needs_compaction(limit)  # closed: nothing more is written


# --- A crash at any durable point loses nothing that was durable ------------------------

# Opens (and so repairs) a damaged journal, commits, compacts, commits: every point a
# daemon passes in the journal's life.
LIFE = """
import asyncio, sys
from pathlib import Path
from liveupdated.journal import Journal
from tests.test_journal import decisions

async def main() -> None:
    groups = decisions()
    journal, records, _ = Journal.open(Path(sys.argv[1]))
    journal.commit_now(groups[0])
    await journal.commit(groups[1])
    await journal.compact(lambda: [*records, *groups[0], *groups[1]])
    await journal.commit(groups[2])
    await journal.aclose()

asyncio.run(main())
"""


def live(tmp_path: Path, damaged: bytes, crash_at: int | None) -> tuple[int, list[str]]:
    """Run LIFE on a journal holding `damaged`, in an empty `tmp_path`: its exit status
    and the points it passed, in order."""
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    (tmp_path / "journal").write_bytes(damaged)
    log = tmp_path.parent / f"{tmp_path.name}.points"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "LIVEUPDATED_POINTS_LOG": str(log)}
    env.pop("LIVEUPDATED_CRASH_AT_POINT", None)
    if crash_at is not None:
        env["LIVEUPDATED_CRASH_AT_POINT"] = str(crash_at)
    done = subprocess.run([sys.executable, "-c", LIFE, str(tmp_path / "journal")], env=env,
                          timeout=60, check=False)
    return done.returncode, log.read_text().splitlines()


def test_a_crash_at_any_point_keeps_what_was_durable_and_the_evidence(
    tmp_path: Path,
) -> None:
    """Killed at each durable point of LIFE in turn, a restart must find every decision
    made durable before that point (and no damage but the original's), and the damaged
    original must survive: still in place, or quarantined whole."""
    groups = decisions()
    first, second = encode(groups[3], whole=True), encode(groups[4], whole=True)
    damaged = bytearray(MAGIC + first + encode(RECORDS, whole=True) + second)
    damaged[len(MAGIC + first) + 20] ^= 0x08  # in the middle frame's payload
    original = bytes(damaged)
    base = [*groups[3], *groups[4]]
    states = [base, [*base, *groups[0]], [*base, *groups[0], *groups[1]],
              [*base, *groups[0], *groups[1], *groups[2]]]
    run = tmp_path / "run"
    run.mkdir()
    status, points = live(run, original, None)
    assert status == 0
    assert points.count("append fdatasync") == 3  # the three commits
    assert points.count("atomic rename") == 2  # the repair and the compaction
    reached = 0  # how many of `states` are durable: never fewer after a later point
    for k in range(1, len(points) + 1):
        status, passed = live(run, original, k)
        assert (status, passed) == (-signal.SIGKILL, points[:k]), k
        repaired = (run / "journal").read_bytes() != original
        journal, records, damages = Journal.open(run / "journal")
        journal.close()
        assert (damages != []) == (not repaired), k  # only the original is damaged
        assert records in states, k
        assert states.index(records) >= reached, k
        reached = states.index(records)
        # Whatever the point, the damaged original is kept whole somewhere.
        copies = [p.read_bytes() for p in run.glob("journal.damaged-*")]
        assert original in copies, k
    assert reached == len(states) - 1
