"""The simulated kernel: a handover area on disk stands in for kexec-preserved memory.

At Reboot each memfd's data extents are copied into a sparse file, checksummed on the
way: a large memfd (over PACK_BYTES) into a file of its own, the small ones of a session
together into the session's pack, each at its own page-aligned offset. The kexec record
(metadata and checksum of every fd) is written last, atomically and fsync'd: it is the
commit point. The data files are left to the page cache, as the memory they stand for
is: an orderly reboot or kexec writes them out (systemd-shutdown syncs), and a crash,
which would have lost the VMs' memory anyway, leaves files whose checksums fail, so that
nothing damaged is ever handed out. The next start finds the record and is, for
liveupdated, a new boot.

Every file is created O_EXCL|O_NOFOLLOW, 0600, so that nothing planted in the area is
followed or reused. A write the disk refuses (full, read-only, I/O error) fails Reboot
with Storage and removes whatever that attempt wrote: a retry or a Cancel starts clean.
"""

import contextlib
import os
import shutil
import stat
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from liveupdated import __version__
from liveupdated.backends import Handover, Key
from liveupdated.core.codec import from_json, to_json
from liveupdated.core.errors import Corrupted, NoSuchToken, Storage
from liveupdated.core.names import escape_path_label
from liveupdated.core.orchestrator import FdEntry
from liveupdated.durable import (
    STORAGE_ERRNOS,
    create_new_file,
    describe,
    fsync_directory,
    point,
    write_atomically,
)
from liveupdated.fds import memfd

log = structlog.get_logger("liveupdated")

RECORD_NAME = "kexec-record.json"
RECORD_TEMP = RECORD_NAME + ".new"  # write_atomically's temp file
DATA_DIR = "data"


@dataclass(frozen=True, slots=True, kw_only=True)
class CarriedFd:
    session: str
    token: str
    file: str
    size: int
    name: str
    seals: int
    position: int
    extents: list[tuple[int, int]]  # the data, in pieces of at most PIECE bytes
    crc32s: list[int] | None = None  # one per piece of `extents`
    crc32: int | None = None  # of all the extents: records written before crc32s
    offset: int = 0  # where its byte 0 lies in `file` (a session's pack holds small fds)


@dataclass(frozen=True, slots=True, kw_only=True)
class KexecRecord:
    boot_id: str
    fds: list[CarriedFd]
    version: str = ""  # of the liveupdated that wrote it ("": written before 0.2.0)


COPY_WORKERS = min(4, os.cpu_count() or 1)  # pieces copied at once, one per core
PIECE = 16 << 20  # bytes: a large memfd is copied by all workers, a piece each
PACK_BYTES = 1 << 20  # apparent size up to which an fd goes into its session's pack
PACK_ALIGN = 4096  # each fd in a pack starts on a page: its holes stay holes
PACK_SUFFIX = "-pack"  # never in a `session.token` file name: escapes are [A-Za-z0-9_]


@dataclass(frozen=True, slots=True)
class _Source:
    key: Key
    fd: int
    size: int
    position: int
    seals: int
    extents: list[tuple[int, int]]


class SimulatedBackend:
    name = "simulated"
    keeps_fd_store = False
    restores_ahead = True  # retrieve_fd copies data: worth doing before it is asked for
    kexec_in_process = False  # no kernel sessions to hold: a `kexec` is PID 1's
    stores_own_fds = False

    def reboot_counts(self) -> None:
        """No evidence but the boot id (and KexecSimulated)."""
        return None

    def __init__(self, area: Path) -> None:
        self.area = area
        self._record: KexecRecord | None = None
        self._carried: dict[Key, CarriedFd] = {}  # the record's fds by key

    def handover_area(self) -> Path:
        """The record and the copies of the fds' data are written here."""
        return self.area

    def adopt(self, key: Key, fd: int) -> None:
        """Never asked: the fds it carries do not come back in the fd store
        (keeps_fd_store is False), so recovery decides no Adopt for it."""
        raise AssertionError(f"the {self.name} backend adopts no fd ({key[0]}/{key[1]})")

    def _data_file(self, key: Key) -> str:
        return f"{escape_path_label(key[0])}.{escape_path_label(key[1])}"

    def find_handover(self) -> Handover | None:
        try:
            record = self._load_record()
        except Corrupted as exc:  # written whole (renamed into place), damaged since
            return Handover(boot_id="unknown", keys=frozenset(), damage=str(exc))
        if record is None:
            return None
        return Handover(record.boot_id, frozenset((f.session, f.token) for f in record.fds))

    def _load_record(self) -> KexecRecord | None:
        if self._record is not None:
            return self._record
        path = self.area / RECORD_NAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: a symlink, planted
            raise Corrupted(f"kexec record {path} cannot be read: {describe(exc)}") from None
        with open(fd, "rb") as f:
            raw = f.read()
        body, _, checksum = raw.rpartition(b"\n")
        try:
            if int(checksum) != zlib.crc32(body):
                raise ValueError("checksum mismatch")
            record = from_json(KexecRecord, body)
        except ValueError as exc:  # codec.DecodeError is one
            raise Corrupted(f"kexec record {path} fails its checks: {exc}") from exc
        self._carried = {(f.session, f.token): f for f in record.fds}
        self._record = record
        return record

    def prepare_handover(self, fds: Mapping[Key, int], entries: Mapping[Key, FdEntry]) -> None:
        """Nothing to do: memfd content may change until the VMs stop."""

    def write_handover(
        self,
        fds: Mapping[Key, int],
        entries: Mapping[Key, FdEntry],
        boot_id: str,
        progress: Callable[[int], None],
    ) -> int:
        """Copy the fds out and write the record; on a refused write, remove it all."""
        started = time.monotonic()
        data_dir = self.area / DATA_DIR
        try:
            self.discard_handover()
            os.mkdir(data_dir, 0o700)
            total, carried = self._copy_all(data_dir, fds, entries, progress)
            data_done = time.monotonic()
            body = to_json(KexecRecord(boot_id=boot_id, fds=carried, version=__version__))
            # The commit point: the area's last temp was removed by discard_handover.
            write_atomically(self.area / RECORD_NAME,
                             body + b"\n" + str(zlib.crc32(body)).encode(),
                             label="handover record", exclusive=True)
        except BaseException as exc:
            self._remove_attempt()
            if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
                raise Storage(f"handover area {self.area}: {describe(exc)}") from exc
            raise
        # The record's fsync waits behind the device's writeback of the copies: apart.
        log.info("simulated_handover_written", fds=len(carried), bytes=total,
                 copy_s=round(data_done - started, 6),
                 record_s=round(time.monotonic() - data_done, 6))
        return total

    def _copy_all(
        self,
        data_dir: Path,
        fds: Mapping[Key, int],
        entries: Mapping[Key, FdEntry],
        progress: Callable[[int], None],
    ) -> tuple[int, list[CarriedFd]]:
        # Facts first, one fd at a time: finding extents moves the file position, which
        # two keys holding one open file would share. The pieces are then copied in
        # parallel with pread/pwrite, which never move it.
        sources = [_source(key, fd) for key, fd in fds.items()]
        # A large fd gets a file of its own; the small ones of a session share one, each
        # at its own offset: creating a file costs more than copying 1 MiB (10,000 small
        # fds took 3-5 s to hand over, most of it in creating their files).
        # A job: pieces of fds to copy into one file, by one thread (two threads writing
        # one file wait for each other on its lock): a pack, or a run of a large fd.
        files: dict[str, int] = {}  # file -> its size
        placed: dict[Key, tuple[str, int]] = {}  # key -> its file and offset there
        packs: dict[str, list[_Copy]] = {}
        jobs: list[list[_Copy]] = []
        for source in sources:
            if source.size <= PACK_BYTES:
                file = f"{escape_path_label(source.key[0])}{PACK_SUFFIX}"
                offset = files.get(file, 0)
                files[file] = -(-(offset + source.size) // PACK_ALIGN) * PACK_ALIGN
                packs.setdefault(file, []).append(_Copy(source, file, offset, source.extents))
            else:
                file, offset = self._data_file(source.key), 0
                files[file] = source.size
                jobs += [[_Copy(source, file, 0, run)] for run in _runs(source.extents)]
            placed[source.key] = (file, offset)
        jobs += packs.values()
        for file, size in files.items():
            self._create(data_dir / file, size)
        crcs: dict[Key, list[int]] = {s.key: [] for s in sources}
        total = 0
        with ThreadPoolExecutor(max_workers=COPY_WORKERS) as workers:
            copies = workers.map(lambda job: _copy_out(data_dir, job), jobs)
            try:
                for job, copied in zip(jobs, copies, strict=True):
                    for copy, pieces in zip(job, copied, strict=True):
                        for length, crc in pieces:
                            crcs[copy.source.key].append(crc)
                            total += length
                    progress(total)
            except BaseException:
                workers.shutdown(cancel_futures=True)  # a full disk: the rest fail too
                raise
        carried = [
            CarriedFd(
                session=source.key[0],
                token=source.key[1],
                file=placed[source.key][0],
                offset=placed[source.key][1],
                size=source.size,
                name=entries[source.key].name,
                seals=source.seals,
                position=source.position,
                extents=source.extents,
                crc32s=crcs[source.key],
            )
            for source in sources
        ]
        return total, carried

    def _remove_attempt(self) -> None:
        """After a failed write_handover: none of its files may stay (best effort: the
        disk that failed the write may fail these too)."""
        for name in (RECORD_TEMP, RECORD_NAME):
            with contextlib.suppress(OSError):
                os.unlink(self.area / name)
        _remove_tree(self.area / DATA_DIR)
        with contextlib.suppress(OSError):
            fsync_directory(self.area)
        self._record = None
        self._carried = {}

    def _create(self, path: Path, size: int) -> None:
        point("handover file create")
        out = create_new_file(path)
        try:
            os.ftruncate(out, size)
        finally:
            os.close(out)

    def discard_handover(self) -> None:
        self.area.mkdir(mode=0o700, parents=True, exist_ok=True)
        removed = False
        for name in (RECORD_NAME, RECORD_TEMP):  # a symlink is removed, not followed
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.area / name)
                removed = True
        if removed:
            fsync_directory(self.area)
        _remove_tree(self.area / DATA_DIR)
        self._record = None
        self._carried = {}

    def carried_size(self, key: Key) -> int | None:
        """From the record, loaded by find_handover at start."""
        carried = self._carried.get(key)
        return None if carried is None else carried.size

    def retrieve_fd(self, key: Key, entry: FdEntry) -> int:
        """Safe in several threads at once, each for its own key (the workers that
        restore ahead of RetrieveFd): the record is loaded before the first is asked."""
        carried = self._carried.get(key) if self._load_record() else None
        if carried is None:
            raise NoSuchToken(f"{key[0]}/{key[1]} is not in the handover of the previous boot")
        path = f"{self.area}/{DATA_DIR}/{carried.file}"
        try:
            src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise Corrupted(f"handover data of {key[0]}/{key[1]} is missing ({path})") from None
        except OSError as exc:  # ELOOP: a symlink, planted
            raise Corrupted(f"handover data of {key[0]}/{key[1]} at {path}: "
                            f"{describe(exc)}") from None
        try:
            size, end = os.fstat(src).st_size, carried.offset + carried.size
            packed = carried.file.endswith(PACK_SUFFIX)  # other fds' data after its end
            if size < end or (size != end and not packed):
                raise Corrupted(f"handover data of {key[0]}/{key[1]} ({carried.file}) has "
                                f"{size} bytes, its record says {end}")
            fd = os.memfd_create(carried.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                if not _copy_back(src, fd, carried):
                    raise Corrupted(
                        f"handover data of {key[0]}/{key[1]} fails its checksum; "
                        "it is not handed out"
                    )
                if os.fstat(fd).st_size != carried.size:  # a hole at the end: not written
                    os.ftruncate(fd, carried.size)
                memfd.finish_restore(fd, carried.position, carried.seals)
            except BaseException:
                os.close(fd)
                raise
            return fd
        finally:
            os.close(src)

    def finish_session(self, session: str, released: Sequence[str]) -> None:
        """Its pack goes (the session is done: what it did not retrieve is released),
        and the files of its large fds that were released. The files are those the
        handover record names, as retrieve_fd reads them: an earlier release escaped
        names otherwise (0.3.0 wrote `65534_2dvm-pack`, this one `_365534_2dvm-pack`), and
        a name computed now would miss its files until Finish."""
        data_dir = self.area / DATA_DIR
        files = {f"{escape_path_label(session)}{PACK_SUFFIX}"}
        files.update(self._data_file((session, token)) for token in released)
        with contextlib.suppress(Corrupted):  # a damaged record names nothing: Finish
            self._load_record()  # loaded by find_handover at start: no read here
        if self._record is not None:
            for (owner, token), carried in self._carried.items():
                if owner == session and (
                    carried.file.endswith(PACK_SUFFIX) or token in released
                ):
                    files.add(carried.file)
        for file in files:
            if "/" not in file and file not in (".", ".."):  # inside the area only
                (data_dir / file).unlink(missing_ok=True)

    def finish(self) -> None:
        self.discard_handover()



def _remove_tree(path: Path) -> None:
    """Remove a directory tree, or whatever else (a symlink, a file) is at `path`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _source(key: Key, fd: int) -> _Source:
    size = os.fstat(fd).st_size
    pieces = [
        (offset, min(PIECE, start + length - offset))
        for start, length in memfd.data_extents(fd, size)
        for offset in range(start, start + length, PIECE)
    ]
    return _Source(key=key, fd=fd, size=size, position=os.lseek(fd, 0, os.SEEK_CUR),
                   seals=memfd.seals_of(fd), extents=pieces)


@dataclass(frozen=True, slots=True)
class _Copy:
    """Pieces of one fd to copy into `file`, its byte 0 at `offset` there."""

    source: _Source
    file: str
    offset: int
    pieces: list[tuple[int, int]]


def _copy_out(data_dir: Path, job: list[_Copy]) -> list[list[tuple[int, int]]]:
    """Copy the pieces of a job into their file (one file a job); (bytes, crc32) of each
    piece, by copy."""
    point("handover data write")
    out = os.open(data_dir / job[0].file, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return [[memfd.copy_extents(copy.source.fd, out, [piece], write_at=copy.offset)
                 for piece in copy.pieces] for copy in job]
    finally:
        os.close(out)


def _runs(pieces: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Consecutive pieces grouped into runs of up to PIECE bytes: one worker writes each
    run, so that a file is written in order by one thread (two threads writing one file
    wait for each other on its lock) and a large one is still shared out."""
    runs: list[list[tuple[int, int]]] = []
    size = PIECE
    for piece in pieces:
        if size + piece[1] > PIECE:
            runs.append([])
            size = 0
        runs[-1].append(piece)
        size += piece[1]
    return runs


def _copy_back(src: int, dst: int, carried: CarriedFd) -> bool:
    """Copy the carried pieces into the new memfd, in parallel if there are several;
    do they match their checksums?"""
    if carried.crc32s is None:  # one checksum of everything, from an older record
        return memfd.copy_extents(src, dst, carried.extents)[1] == carried.crc32
    if len(carried.crc32s) != len(carried.extents):
        return False

    def copy(piece: tuple[int, int]) -> int:
        return memfd.copy_extents(src, dst, [piece], read_at=carried.offset)[1]

    if sum(length for _, length in carried.extents) <= PIECE:  # a pool costs more here
        return [copy(piece) for piece in carried.extents] == carried.crc32s
    with ThreadPoolExecutor(max_workers=min(COPY_WORKERS, len(carried.extents) or 1)) as pool:
        crcs = list(pool.map(copy, carried.extents))
    return crcs == carried.crc32s
