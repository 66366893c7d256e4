"""The memfd handler: recognise a memfd, read its facts, and rebuild one exactly.

Content is moved by pread/pwrite of the data extents found with SEEK_DATA/SEEK_HOLE,
a chunk at a time, and checksummed by zlib on the way; this module never loops over
bytes in Python.
"""

import ctypes
import errno
import fcntl
import functools
import os
import stat
import sys
import zlib

from liveupdated.core.errors import Corrupted, UnsupportedFd
from liveupdated.core.orchestrator import FdFacts

KIND = "memfd"
SUPPORTED = "supported: memfd (memfd_create, without MFD_HUGETLB)"
HUGETLBFS_MAGIC = 0x958458F6
TMPFS_MAGIC = 0x01021994  # shmem, which memfd_create's files live on
_COPY_CHUNK = 1 << 20  # bytes per read and write: fits a core's cache
_libc = ctypes.CDLL(None, use_errno=True)


def _filesystem_type(fd: int) -> int:
    """f_type of fstatfs(fd): what the kernel says the file's filesystem is."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder) & 0xFFFFFFFF


@functools.cache
def memfd_device() -> int:
    """st_dev of every memfd_create file (without MFD_HUGETLB): the kernel's internal
    shmem mount, which no path reaches. Learnt once from a memfd of our own."""
    fd = os.memfd_create("liveupdated-probe", os.MFD_CLOEXEC)
    try:
        if _filesystem_type(fd) != TMPFS_MAGIC:
            raise OSError(errno.EINVAL, "a memfd that is not on shmem")
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "unknown"


def memfd_name(link: str) -> str | None:
    """`NAME` of a /proc fd link "/memfd:NAME (deleted)", or None if it is no memfd."""
    if not link.startswith("/memfd:"):
        return None
    name = link[len("/memfd:") :]
    return name.removesuffix(" (deleted)")


def inspect(fd: int) -> FdFacts:
    """The facts of a memfd; UnsupportedFd naming the supported types for anything else."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise UnsupportedFd(f"fd is not usable ({exc.strerror}); {SUPPORTED}") from exc
    link = _describe(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFd(f"fd is {_kind_of(st.st_mode, link)}, not a memfd; {SUPPORTED}")
    if flags & getattr(os, "O_PATH", 0o10000000):
        raise UnsupportedFd(f"fd is an O_PATH handle of a file; {SUPPORTED}")
    try:
        fs_type = _filesystem_type(fd)
    except OSError as exc:
        raise UnsupportedFd(f"fd is not usable ({exc.strerror}); {SUPPORTED}") from exc
    if fs_type == HUGETLBFS_MAGIC:
        raise UnsupportedFd(f"fd is a hugetlb memfd; {SUPPORTED}")
    # What the file is, by the kernel: on the internal shmem mount, as only memfds
    # handed out by memfd_create are. Its /proc link is a path anyone can shape (a
    # file named "memfd:x" at the root of a detached mount reads "/memfd:x"), and seals
    # cannot tell either (a tmpfs file reports F_SEAL_SEAL like an unsealable memfd).
    name = memfd_name(link)
    if st.st_dev != memfd_device() or fs_type != TMPFS_MAGIC or name is None:
        raise UnsupportedFd(
            f"fd is a regular file ({link}, {_fs_name(fs_type)} device {st.st_dev}), not a "
            f"memfd from memfd_create; {SUPPORTED}")
    if flags & os.O_ACCMODE == os.O_WRONLY:
        raise UnsupportedFd("memfd is open write-only; hand over a readable fd")
    return FdFacts(kind=KIND, size=st.st_size, name=name, seals=seals_of(fd),
                   dev=st.st_dev, ino=st.st_ino)


def _fs_name(fs_type: int) -> str:
    return "tmpfs" if fs_type == TMPFS_MAGIC else f"filesystem {fs_type:#x}"


def _kind_of(mode: int, link: str) -> str:
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return f"a device ({link})"
    if stat.S_ISREG(mode):
        return "a regular file"
    return f"an unsupported object ({link})"


def seals_of(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return 0
        raise


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every data extent, holes skipped. The file position, which
    the fd shares with its owner, is left where it was."""
    extents: list[tuple[int, int]] = []
    position = os.lseek(fd, 0, os.SEEK_CUR)
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only holes from here on
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end > start:
                extents.append((start, end - start))
            offset = end
    finally:
        os.lseek(fd, position, os.SEEK_SET)
    return extents


def copy_extents(src: int, dst: int, extents: list[tuple[int, int]], *,
                 read_at: int = 0, write_at: int = 0) -> tuple[int, int]:
    """Copy the given extents of src to the same offsets of dst (shifted by `read_at` in
    src and by `write_at` in dst); (bytes copied, crc32 of them in order). pread/pwrite,
    never the file position (other holders share it) nor a mapping (a source truncated
    meanwhile ends the copy with Corrupted, not SIGBUS); the checksum is taken of each
    chunk while it is in the CPU's cache."""
    copied = crc = 0
    if not extents:
        return copied, crc
    buffer = memoryview(bytearray(min(_COPY_CHUNK, max(length for _, length in extents))))
    for start, length in extents:
        offset, end = start, start + length
        while offset < end:
            chunk = buffer[: min(len(buffer), end - offset)]
            got = os.preadv(src, [chunk], read_at + offset)
            if got == 0:
                raise Corrupted(f"source ended at byte {offset}, expected data up to {end}")
            data = chunk[:got]
            crc = zlib.crc32(data, crc)
            write_all(dst, data, write_at + offset)
            offset += got
            copied += got
    return copied, crc


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite all of `data` at `offset` (a write may be short)."""
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


def create(name: str, size: int) -> int:
    """A fresh, unsealed memfd of `size` bytes (all holes) that can take seals later."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def finish_restore(fd: int, position: int, seals: int) -> None:
    """Set the file position and the original seals, in that order (seals may forbid more)."""
    os.lseek(fd, position, os.SEEK_SET)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
