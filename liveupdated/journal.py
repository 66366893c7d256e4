"""The durable record of every state change: an append-only file of checksummed frames.

A frame is `<u32 length><u32 crc32>` and a JSON record, or the JSON list of the records of
one decision (a torn write keeps all of them or none). Commits are group-fsync'd off the
event loop. At replay a torn or corrupt tail is cut, and a damaged frame in the middle is
skipped; no damaged record is ever applied. This module never interprets records.
"""

import asyncio
import contextlib
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from liveupdated.core.codec import to_json
from liveupdated.core.records import Record, decode_group, decode_records

MAGIC = b"LUJRNL\x00\x01"
_FRAME = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 20
_PARSE_CHUNK = 1024


@dataclass(frozen=True)
class Damage:
    """A damaged frame found at replay: skipped if valid frames follow, else cut off."""

    offset: int
    length: int
    reason: str
    cut: bool


def encode(records: Iterable[Record], whole: bool = False) -> bytes:
    """A frame per record; with `whole`, one frame holding the list of them all, so that
    a torn write keeps all or none (unless that frame would pass MAX_RECORD_BYTES)."""
    payloads = [to_json(record) for record in records]
    if whole and len(payloads) > 1:
        group = b"[" + b",".join(payloads) + b"]"
        if len(group) <= MAX_RECORD_BYTES:
            payloads = [group]
    out = bytearray()
    for payload in payloads:
        out += _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
    return bytes(out)


def _frame(data: bytes, offset: int) -> tuple[int, bytes | None, str]:
    """(end of the frame, its payload if its checksum holds, what is wrong); end is -1
    when the frame cannot even be delimited."""
    if offset + _FRAME.size > len(data):
        return -1, None, "torn frame header"
    length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    if length > MAX_RECORD_BYTES or start + length > len(data):
        return -1, None, "torn frame (length past the end)"
    payload = data[start : start + length]
    if zlib.crc32(payload) != crc:
        return start + length, None, "checksum mismatch"
    return start + length, payload, ""


def decode(data: bytes) -> tuple[list[Record], list[Damage], int]:
    """The records of a journal image, its damaged frames, and where its valid part ends.

    A damaged frame followed by a valid one is bit rot in the middle: it is skipped, so
    the records after it (other sessions) survive. Anything else is a torn tail: cut.
    """
    if data[: len(MAGIC)] != MAGIC:
        return [], [Damage(0, len(data), "bad or missing journal header", cut=True)], 0
    starts: list[int] = []  # of each valid frame
    payloads: list[bytes] = []  # of each valid frame
    damages: list[Damage] = []
    offset = _valid_frames(data, len(MAGIC), starts, payloads)
    while offset < len(data):
        end, _, problem = _frame(data, offset)
        if end < 0 or end == len(data) or _frame(data, end)[1] is None:
            damages.append(Damage(offset, len(data) - offset, problem, cut=True))
            return _parse(starts, payloads, damages), damages, offset
        damages.append(Damage(offset, end - offset, problem, cut=False))
        offset = _valid_frames(data, end, starts, payloads)
    return _parse(starts, payloads, damages), damages, offset


def _valid_frames(data: bytes, offset: int, starts: list[int], payloads: list[bytes]) -> int:
    """Append the start and payload of each frame from `offset` on while they are whole
    and checksum (what `_frame` checks, inline: replay walks every frame); where the
    first one that is not starts."""
    header, size, unpack, crc32 = _FRAME.size, len(data), _FRAME.unpack_from, zlib.crc32
    while offset + header <= size:
        length, crc = unpack(data, offset)
        end = offset + header + length
        if length > MAX_RECORD_BYTES or end > size:
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


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write, fsync, rename over `path`, fsync the directory: all or nothing."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_directory(path.parent)


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

    @classmethod
    def open(cls, path: Path) -> tuple["Journal", list[Record], list[Damage]]:
        """Open (or create) the journal, replay it and cut a damaged tail."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            write_atomically(path, MAGIC)
        data = path.read_bytes()
        records, damages, end = decode(data)
        if end == 0:
            write_atomically(path, MAGIC)
        elif end < len(data):
            with path.open("r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return cls(path, fd), records, damages

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

    def _write_and_sync(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fdatasync(self._fd)
        self.fsyncs += 1

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

    def _replace(self, data: bytes) -> None:
        write_atomically(self.path, data)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    async def rewrite(self, snapshot: Callable[[], Iterable[Record]]) -> None:
        """After a failed write: the whole state written anew (a compaction), and on
        success the journal takes writes again. Raises what the disk says if it fails."""
        self._error = None
        await self.compact(snapshot)
        if self._error is not None:
            raise self._error
