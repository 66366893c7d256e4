"""The durable record of every state change: an append-only file of checksummed frames.

A frame is `<u32 length><u32 crc32>` and a JSON record, or the JSON list of the records of
one decision (a torn write keeps all of them or none), after an 8-byte header. Commits are
group-fsync'd off the event loop; the journal is compacted to the live state when it grows.

Replay keeps every frame that checksums: after damage (a flipped bit, zeroes, garbage, a
damaged header) it resynchronises on the next frame that delimits and checksums, and
reports each skipped region. Only a torn tail, with nothing valid after it, is cut.

This module never applies a damaged record, never interprets records, and never destroys
evidence: before it repairs a journal it keeps the original as a quarantined copy.
"""

import asyncio
import contextlib
import json
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from liveupdated.core.codec import to_json
from liveupdated.core.records import Record, decode_group, decode_records
from liveupdated.durable import append_and_sync, fsync_directory, write_atomically, write_new_file

# fsync_directory and write_atomically moved to liveupdated.durable; re-exported for the
# modules that import them from here.
__all__ = [
    "COMPACT_AT_BYTES",
    "MAGIC",
    "MAX_FRAME_READ_BYTES",
    "MAX_RECORD_BYTES",
    "Damage",
    "Journal",
    "decode",
    "encode",
    "fsync_directory",
    "write_atomically",
]

MAGIC = b"LUJRNL\x00\x01"
_FRAME = struct.Struct("<II")
# The writer's bound: no frame is written larger (callers bound their records far below).
MAX_RECORD_BYTES = 1 << 20
# The reader's bound, far above the writer's: a frame a version with a larger writer's
# bound wrote must be read, not taken for damage. It only has to reject lengths that no
# writer ever wrote, so that a damaged length field is recognised as one.
MAX_FRAME_READ_BYTES = 64 << 20
# Compact once the journal passes this. A restart replays the whole journal on the
# blackout path (after the kexec, before any VMM gets its memory back): 2 MiB, about
# 12,000 decisions, replays in ~50 ms (8 MiB would take ~200 ms). The live state it
# compacts to is typically a few KiB, so a compaction (one atomic rewrite) stays rare.
COMPACT_AT_BYTES = 2 << 20
_PARSE_CHUNK = 1024
# Where a payload may start: every record is a JSON object, every group a JSON list.
_PAYLOAD_START = re.compile(rb"[{\[]")


@dataclass(frozen=True)
class Damage:
    """A damaged region found at replay: skipped if valid frames follow, else cut off.
    `quarantine` is the copy of the journal as it was found, when `Journal.open` kept one
    before repairing it."""

    offset: int
    length: int
    reason: str
    cut: bool
    quarantine: Path | None = None


def encode(records: Iterable[Record], whole: bool = False) -> bytes:
    """A frame per record; with `whole`, one frame holding the list of them all, so that
    a torn write keeps all or none (unless that frame would pass MAX_RECORD_BYTES).
    ValueError if a single record would pass it: nothing is encoded, so the caller can
    refuse the request."""
    payloads = [to_json(record) for record in records]
    if whole and len(payloads) > 1:
        group = b"[" + b",".join(payloads) + b"]"
        if len(group) <= MAX_RECORD_BYTES:
            return _FRAME.pack(len(group), zlib.crc32(group)) + group
    out = bytearray()
    for payload in payloads:
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(
                f"a journal record of {len(payload)} bytes passes the bound of "
                f"{MAX_RECORD_BYTES}"
            )
        out += _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
    return bytes(out)


def _problem(data: bytes, offset: int) -> str:
    """What is wrong with the frame at `offset` (where `_valid_frames` stopped)."""
    if offset + _FRAME.size > len(data):
        return "torn frame header"
    length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    if not 0 < length <= MAX_FRAME_READ_BYTES:
        return f"impossible frame length {length}"
    if start + length > len(data):
        return "torn frame (length past the end)"
    if zlib.crc32(data[start : start + length]) != crc:
        return "checksum mismatch"
    return "unreadable frame"  # not reached: `_valid_frames` would have taken it


def _next_frame(data: bytes, offset: int) -> int:
    """Where the first frame at or after `offset` starts that delimits, checksums and
    holds JSON, or -1. Candidates are found by their payload's first byte (a C-speed
    search), and the checksum is computed only for those whose length fits: in a JSON
    payload four bytes read as a length are at least 0x20000000, so scanning through
    the text of records costs next to nothing."""
    header, size, unpack, crc32 = _FRAME.size, len(data), _FRAME.unpack_from, zlib.crc32
    for match in _PAYLOAD_START.finditer(data, offset + header):
        start = match.start()
        length, crc = unpack(data, start - header)
        end = start + length
        if length > MAX_FRAME_READ_BYTES or end > size:
            continue
        payload = data[start:end]
        if crc32(payload) == crc and _is_json(payload):
            return start - header
    return -1


def _is_json(payload: bytes) -> bool:
    """A last guard against a chance checksum match while resynchronising."""
    try:
        return isinstance(json.loads(payload), dict | list)
    except (ValueError, RecursionError):
        return False


def decode(data: bytes) -> tuple[list[Record], list[Damage], int]:
    """The records of a journal image, its damaged regions, and where its valid part
    ends (the start of a torn tail, else the end of `data`)."""
    records, damages, end, _ = _decode(data)
    return records, damages, end


def _decode(data: bytes) -> tuple[list[Record], list[Damage], int, list[tuple[int, int]]]:
    """`decode`, and the (start, end) of each frame whose records were kept if there is
    damage (else none: the journal is kept as it is).

    After a damaged frame (or header) the frames are resynchronised on the first one that
    delimits and checksums further on: each region skipped is one Damage, and a damaged
    length field loses only its own frame. Damage with no valid frame after it is a torn
    tail: cut."""
    starts: list[int] = []  # of each valid frame
    payloads: list[bytes] = []  # of each valid frame
    damages: list[Damage] = []
    size, end = len(data), len(data)
    if data[: len(MAGIC)] == MAGIC:
        offset = _valid_frames(data, len(MAGIC), starts, payloads)
        bad, scan, problem = 0, 0, ""  # set at the first damaged frame, if any
    else:
        # Scanned from 0, not 8: what damaged the header may have shortened it too.
        offset, bad, scan, problem = 0, 0, 0, "bad or missing journal header"
    while problem or offset < size:
        if not problem:
            # From the next byte, not from where its length says it ends: the length
            # may be what is damaged, and point past valid frames.
            bad, scan, problem = offset, offset + 1, _problem(data, offset)
        following = _next_frame(data, scan)
        if following < 0:
            damages.append(Damage(bad, size - bad, problem, cut=True))
            end = bad
            break
        damages.append(Damage(bad, following - bad, problem, cut=False))
        offset = _valid_frames(data, following, starts, payloads)
        problem = ""
    records = _parse(starts, payloads, damages)
    if not damages:  # the common case, on the blackout path: nothing to rewrite
        return records, damages, end, []
    unreadable = {d.offset for d in damages}  # a valid frame there did not parse
    frames = [
        (start, start + _FRAME.size + len(payload))
        for start, payload in zip(starts, payloads, strict=True)
        if start not in unreadable
    ]
    return records, damages, end, frames


def _valid_frames(data: bytes, offset: int, starts: list[int], payloads: list[bytes]) -> int:
    """Append the start and payload of each frame from `offset` on while they are whole
    and checksum (what `_problem` checks, inline: replay walks every frame); where the
    first one that is not starts. A zero length is never written: refusing it makes a
    zeroed region damage rather than a run of empty frames (the crc32 of b"" is 0)."""
    header, size, unpack, crc32 = _FRAME.size, len(data), _FRAME.unpack_from, zlib.crc32
    while offset + header <= size:
        length, crc = unpack(data, offset)
        end = offset + header + length
        if not 0 < length <= MAX_FRAME_READ_BYTES or end > size:
            break
        payload = data[offset + header : end]
        if crc32(payload) != crc:
            break
        starts.append(offset)
        payloads.append(payload)
        offset = end
    return offset


def _parse(starts: list[int], payloads: list[bytes], damages: list[Damage]) -> list[Record]:
    """Frames parsed a chunk per call (one JSON parse per chunk, and without the memory
    peak of one call for all); a frame that checksums but does not parse is found one by
    one and skipped."""
    records: list[Record] = []
    for first in range(0, len(payloads), _PARSE_CHUNK):
        chunk = payloads[first : first + _PARSE_CHUNK]
        try:
            records += decode_records(chunk)
            continue
        except ValueError:
            pass
        for offset, payload in zip(starts[first : first + _PARSE_CHUNK], chunk, strict=True):
            try:
                records += decode_group(payload)
            except ValueError as exc:
                reason = f"unreadable record: {exc}"
                damages.append(Damage(offset, _FRAME.size + len(payload), reason, cut=False))
    damages.sort(key=lambda d: d.offset)
    return records


class Journal:
    """Group commit: at most one write+fdatasync in flight, in a worker thread; records
    enqueued meanwhile form the next batch, written as soon as the one in flight is done.
    An idle journal starts writing at the end of the loop's turn, so that the calls read
    from the bus in one go share a write."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._pending: list[bytes] = []
        self._next_batch: asyncio.Future[None] | None = None  # what _pending will be
        self._in_flight: asyncio.Future[None] | None = None  # the batch being written
        self._held = False  # compaction in progress: writes wait for the new file
        self._closing = False  # aclose() called: nothing more is written
        self._error: BaseException | None = None  # a failed write: nothing is durable now
        self.commits = 0
        self.fsyncs = 0
        self.mark_fd = -1  # a memfd kept outside the disk: see `Watermark`
        # Bytes in the file: what replay would read. Kept by the one writer at a time.
        self.size = os.fstat(fd).st_size if fd >= 0 else 0
        # What the last compaction left (the live state's size); at open, what replay
        # read: a journal just replayed is not rewritten until it has doubled, so that no
        # compaction holds the restores' records back right after a reboot (the blackout).
        self._compacted_size = self.size

    @classmethod
    def open(
        cls, path: Path, refused: OSError | None = None
    ) -> tuple["Journal", list[Record], list[Damage]]:
        """Open (or create) the journal and replay it. A damaged journal is first copied
        to a quarantine file (named in each Damage), then rewritten with only its valid
        frames, so that appends never land after garbage. With `refused` (the disk
        refuses writes) it is only read: every write fails with `refused` until a
        compaction (`rewrite`) succeeds."""
        if refused is not None:
            data = path.read_bytes() if path.exists() else MAGIC
            records, damages, _, _ = _decode(data)
            journal = cls(path, -1)
            journal._error = refused
            return journal, records, damages
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            write_atomically(path, MAGIC)
        data = path.read_bytes()
        records, damages, _, frames = _decode(data)
        if damages:
            quarantine = _quarantine(path, data)
            write_atomically(path, MAGIC + b"".join(data[a:b] for a, b in frames))
            damages = [replace(damage, quarantine=quarantine) for damage in damages]
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return cls(path, fd), records, damages

    @classmethod
    def unreadable(cls, path: Path, error: OSError) -> "Journal":
        """A journal that could not even be read: nothing is written to it, ever (a
        rewrite would replace records that may still be read once the disk recovers)."""
        journal = cls(path, -1)
        journal._error = error
        return journal

    def refuse(self, error: OSError) -> None:
        """The disk refused a write outside the group commit (start-up): every write
        fails with `error` until a compaction (`rewrite`) succeeds."""
        self._error = error

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def aclose(self) -> None:
        """Write what is enqueued, then close; nothing is written after."""
        with contextlib.suppress(Exception):  # a failed journal is closed all the same
            await self.flush()
        self._closing = True
        while self._in_flight is not None:
            await asyncio.wait([self._in_flight])
        self.close()

    def mark_now(self) -> None:
        """Start-up: the watermark says what the (possibly repaired) journal is now."""
        self._mark()

    def _mark(self) -> None:
        """Record the file and the length the journal has now reached (after its fsync)."""
        if self.mark_fd >= 0 and self._fd >= 0:
            st = os.fstat(self._fd)
            os.pwrite(self.mark_fd, Watermark(st.st_dev, st.st_ino, self.size).pack(), 0)

    def _write_and_sync(self, data: bytes) -> None:
        append_and_sync(self._fd, data)
        self.size += len(data)
        self.fsyncs += 1
        self._mark()

    def commit_now(self, records: Iterable[Record]) -> None:
        """Blocking commit, for start-up and shutdown paths outside the event loop's work."""
        data = encode(records, whole=True)
        if data:
            self._write_and_sync(data)
            self.commits += 1

    async def commit(self, records: Sequence[Record]) -> None:
        """Durable when this returns. Concurrent commits share one fsync (group commit)."""
        self.enqueue(records)
        await self.flush()

    def enqueue(self, records: Sequence[Record]) -> None:
        """Put the records of one decision in line now, in the order of the decisions;
        they are durable once `flush` returns, all of them or (after a crash) none."""
        if records:
            self._pending.append(encode(records, whole=True))
            self.commits += 1
            if len(self._pending) == 1 and self._in_flight is None:
                with contextlib.suppress(RuntimeError):  # outside the loop: flush writes
                    asyncio.get_running_loop().call_soon(self._write_next)

    async def flush(self) -> None:
        """Until everything enqueued so far is durable."""
        self._write_next()
        if self._error is not None:  # also when the write just tried could not start
            raise self._error
        if self._pending:  # behind the batch in flight, or a compaction
            if self._next_batch is None:
                self._next_batch = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._next_batch)
        elif self._in_flight is not None:
            await asyncio.shield(self._in_flight)

    def _write_next(self) -> None:
        """Start writing what is pending, unless a write or a compaction is under way."""
        if not self._pending or self._in_flight is not None or self._held:
            return
        if self._closing or self._error is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the loop: the next flush (or commit_now) writes
            return
        data = b"".join(self._pending)
        try:
            write = loop.run_in_executor(None, self._write_and_sync, data)
        except RuntimeError as exc:  # no thread to write with: as good as a failed write
            self._fail(exc, self._next_batch)
            return
        self._pending.clear()
        batch, self._next_batch = self._next_batch or loop.create_future(), None
        self._in_flight = batch
        write.add_done_callback(lambda done: self._written(batch, done))

    def _written(self, batch: asyncio.Future[None], write: asyncio.Future[None]) -> None:
        self._in_flight = None
        error = write.exception() if not write.cancelled() else asyncio.CancelledError()
        if error is None:
            batch.set_result(None)
            self._write_next()
        else:
            self._fail(error, batch)

    def _fail(self, error: BaseException, batch: asyncio.Future[None] | None) -> None:
        """A write failed: nothing more is written, and every waiter gets the error."""
        self._error = error
        for waiting in (batch, self._next_batch):
            if waiting is not None and not waiting.done():
                waiting.set_exception(error)
                waiting.exception()  # retrieved: whoever waits gets it raised
        self._next_batch = None

    async def compact(self, snapshot: Callable[[], Iterable[Record]]) -> None:
        """Replace the journal with `snapshot()` (the live state), crash-safely, between
        two writes. Records are applied to the state before they are enqueued, so the
        snapshot holds everything enqueued until now: what is still pending is dropped,
        and whoever waits for it waits for the new file."""
        self._held = True
        try:
            while self._in_flight is not None:
                await asyncio.wait([self._in_flight])
            if self._error is not None:
                raise self._error
            data = MAGIC + encode(snapshot())
            self._pending.clear()
            covered = self._next_batch or asyncio.get_running_loop().create_future()
            self._next_batch, self._in_flight = None, covered
            replace = asyncio.ensure_future(asyncio.to_thread(self._replace, data))
            try:
                await asyncio.shield(replace)
            finally:
                if not replace.done():  # cancelled: the thread swaps the file, let it end
                    await asyncio.wait([replace])
                if (error := replace.exception()) is None:
                    covered.set_result(None)
                else:
                    self._fail(error, covered)
        finally:
            self._in_flight = None
            self._held = False
            self._write_next()

    def needs_compaction(self, limit: int = COMPACT_AT_BYTES) -> bool:
        """Has the journal passed `limit`, and at least doubled since the last compaction?
        The second condition keeps a live state larger than `limit` from being rewritten
        after every flush: a compaction then costs at most as much as the appends that
        made it due. False while a compaction runs, or once closing or failed."""
        return (
            self.size > max(limit, 2 * self._compacted_size)
            and not self._held
            and not self._closing
            and self._error is None
        )

    def _replace(self, data: bytes) -> None:
        write_atomically(self.path, data)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.size = self._compacted_size = len(data)
        self._mark()

    async def rewrite(self, snapshot: Callable[[], Iterable[Record]]) -> None:
        """After a failed write: the whole state written anew (a compaction), and on
        success the journal takes writes again. Raises what the disk says if it fails."""
        self._error = None
        await self.compact(snapshot)
        if self._error is not None:
            raise self._error


@dataclass(frozen=True)
class Watermark:
    """Which journal file reached which length, kept in a memfd in systemd's fd store
    (off the disk), so that a journal cut at a frame boundary, which reads as whole, is
    still found out at the next start: a shorter or another file than the mark says."""

    dev: int
    ino: int
    size: int

    _FORMAT = struct.Struct("<QQQ")

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.dev, self.ino, self.size)

    @classmethod
    def read(cls, fd: int) -> "Watermark | None":
        data = os.pread(fd, cls._FORMAT.size, 0)
        if len(data) != cls._FORMAT.size:
            return None
        return cls(*cls._FORMAT.unpack(data))

    def disagrees(self, path: Path) -> str:
        """What is wrong with the journal at `path` by this mark ("" if nothing)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return "the journal is gone"
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            return "the journal is not the file this daemon last wrote"
        if st.st_size < self.size:
            return f"the journal is {st.st_size} bytes; {self.size} were written"
        return ""


def _quarantine(path: Path, data: bytes) -> Path:
    """Keep `data`, the journal as found, in a new file next to it for an admin to
    inspect: never over an existing file, durable before the journal is repaired."""
    stamp = time.time_ns()
    while True:
        copy = path.with_name(f"{path.name}.damaged-{stamp}")
        try:
            write_new_file(copy, data)
        except FileExistsError:  # another copy from this very nanosecond
            stamp += 1
            continue
        return copy
