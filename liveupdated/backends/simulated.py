"""The simulated kernel: a handover area on disk stands in for kexec-preserved memory.

At Reboot each memfd's data extents are copied kernel-side into a sparse file, and the
kexec record (metadata of every fd, checksummed) is written last and atomically: it is
the commit point. The next start finds the record and is, for liveupdated, a new boot.
"""

import ctypes
import os
import shutil
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from liveupdated.backends import Handover, Key
from liveupdated.core.codec import from_json, to_json
from liveupdated.core.errors import Corrupted, NoSuchToken
from liveupdated.core.names import escape_path_label
from liveupdated.core.orchestrator import FdEntry
from liveupdated.fds import memfd
from liveupdated.journal import fsync_directory, write_atomically

RECORD_NAME = "kexec-record.json"
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
    extents: list[tuple[int, int]]
    crc32: int  # of the data extents, in order


@dataclass(frozen=True, slots=True, kw_only=True)
class KexecRecord:
    boot_id: str
    fds: list[CarriedFd]


_libc = ctypes.CDLL(None, use_errno=True)


def _start_writeback(fd: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing this file out now, without
    waiting, so the disk works while the next memfd is copied."""
    _libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), 2)


def _syncfs(path: Path) -> None:
    """syncfs(2): every file written so far on this filesystem is on disk when it returns
    (it reports writeback errors since Linux 5.8)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class SimulatedBackend:
    name = "simulated"

    def __init__(self, area: Path) -> None:
        self.area = area
        self._record: KexecRecord | None = None

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
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        body, _, checksum = raw.rpartition(b"\n")
        try:
            if int(checksum) != zlib.crc32(body):
                raise ValueError("checksum mismatch")
            self._record = from_json(KexecRecord, body)
        except ValueError as exc:  # codec.DecodeError is one
            raise Corrupted(f"kexec record {path} fails its checks: {exc}") from exc
        return self._record

    def prepare_handover(self, fds: Mapping[Key, int], entries: Mapping[Key, FdEntry]) -> None:
        """Nothing to do: memfd content may change until the VMs stop."""

    def write_handover(
        self,
        fds: Mapping[Key, int],
        entries: Mapping[Key, FdEntry],
        boot_id: str,
        progress: Callable[[int], None],
    ) -> int:
        self.discard_handover()
        data_dir = self.area / DATA_DIR
        data_dir.mkdir(parents=True)
        carried: list[CarriedFd] = []
        total = 0
        with ThreadPoolExecutor(max_workers=1) as checksummer:
            for key, fd in fds.items():
                entry = entries[key]
                size = os.fstat(fd).st_size
                position = os.lseek(fd, 0, os.SEEK_CUR)
                extents = memfd.data_extents(fd, size)
                crc = checksummer.submit(memfd.checksum, fd, extents)  # beside the copy
                file = self._data_file(key)
                out = os.open(data_dir / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
                try:
                    os.ftruncate(out, size)
                    total += memfd.copy_extents(fd, out, extents)
                    _start_writeback(out)
                finally:
                    os.close(out)
                progress(total)
                carried.append(
                    CarriedFd(
                        session=key[0],
                        token=key[1],
                        file=file,
                        size=size,
                        name=entry.name,
                        seals=memfd.seals_of(fd),
                        position=position,
                        extents=extents,
                        crc32=crc.result(),
                    )
                )
        _syncfs(data_dir)  # one flush of the whole filesystem beats a fsync per file
        fsync_directory(data_dir)
        body = to_json(KexecRecord(boot_id=boot_id, fds=carried))
        write_atomically(self.area / RECORD_NAME, body + b"\n" + str(zlib.crc32(body)).encode())
        return total

    def discard_handover(self) -> None:
        record = self.area / RECORD_NAME
        if record.exists():
            record.unlink()
            fsync_directory(self.area)
        shutil.rmtree(self.area / DATA_DIR, ignore_errors=True)
        self.area.mkdir(parents=True, exist_ok=True)
        self._record = None

    def retrieve_fd(self, key: Key, entry: FdEntry) -> int:
        record = self._load_record()
        carried = next(
            (f for f in record.fds if (f.session, f.token) == key), None
        ) if record else None
        if carried is None:
            raise NoSuchToken(f"{key[0]}/{key[1]} is not in the handover of the previous boot")
        path = self.area / DATA_DIR / carried.file
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Corrupted(f"handover data of {key[0]}/{key[1]} is missing ({path})") from None
        try:
            if os.fstat(src).st_size != carried.size:
                raise Corrupted(
                    f"handover data of {key[0]}/{key[1]} has {os.fstat(src).st_size} bytes, "
                    f"its record says {carried.size}"
                )
            fd = memfd.create(carried.name, carried.size)
            try:
                with ThreadPoolExecutor(max_workers=1) as checksummer:
                    crc = checksummer.submit(memfd.checksum, src, carried.extents)
                    memfd.copy_extents(src, fd, carried.extents)
                if crc.result() != carried.crc32:
                    raise Corrupted(
                        f"handover data of {key[0]}/{key[1]} fails its checksum; "
                        "it is not handed out"
                    )
                memfd.finish_restore(fd, carried.position, carried.seals)
            except BaseException:
                os.close(fd)
                raise
            return fd
        finally:
            os.close(src)

    def finish_session(self, session: str, released: Sequence[str]) -> None:
        for token in released:
            (self.area / DATA_DIR / self._data_file((session, token))).unlink(missing_ok=True)

    def finish(self) -> None:
        self.discard_handover()

