"""Every durable write the daemon makes, and the crash points that tests enumerate.

The primitives here (atomic replace, append+fdatasync, exclusive creation, directory
fsync) are the only places the daemon makes something durable. Each calls `point(name)`
immediately before each durable step, so that a test can kill the process at exactly
that step and check what a restart finds. This module never interprets what it writes,
never follows a symlink when creating a file, and never lets a partly written file take
the place of a whole one.

The crash hook is for tests only: LIVEUPDATED_CRASH_AT_POINT=N makes the Nth call of
`point` (1-based, all names counted) kill the process with SIGKILL; LIVEUPDATED_POINTS_LOG
names a file each point's name is appended to, a line per call, before any kill. Both are
read once, at import. Unset, a point costs a counter increment and one comparison.
"""

import errno
import itertools
import os
import signal
import threading
from collections import Counter
from pathlib import Path

CRASH_AT_POINT_ENV = "LIVEUPDATED_CRASH_AT_POINT"
POINTS_LOG_ENV = "LIVEUPDATED_POINTS_LOG"

_CRASH_AT = int(os.environ.get(CRASH_AT_POINT_ENV) or 0)
_POINTS_LOG = os.environ.get(POINTS_LOG_ENV) or None
_ARMED = bool(_CRASH_AT or _POINTS_LOG)

# Calls of `point` per name since import, for tests. Not locked: points passed from two
# threads at once may lose an increment, which only a test could notice, and tests that
# read it pass points from one thread.
counts: Counter[str] = Counter()

_armed_lock = threading.Lock()  # so that "the Nth point" is exact across threads
_armed_calls = itertools.count(1)  # numbers the calls of `point`, once armed


# A disk that refuses a write: the storage is at fault, not the configuration.
STORAGE_ERRNOS = frozenset(
    {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EACCES,
     errno.EPERM}
)


def describe(exc: OSError) -> str:
    """`No space left on device (ENOSPC)`: the text and the errno's name (its number if
    it has none; nothing for an OSError without an errno)."""
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else ""
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def point(name: str) -> None:
    """Called immediately before a durable step (write, fsync, fdatasync, rename,
    directory fsync, fd store message, handover write); `name` says which."""
    counts[name] += 1
    if _ARMED:  # the one comparison a daemon that is not under test pays
        _armed_point(name)


def _armed_point(name: str) -> None:
    with _armed_lock:
        number = next(_armed_calls)
        if _POINTS_LOG is not None:
            # Line-buffered and flushed: the line is in the kernel before any kill, so
            # the log lists every point the run passed, the fatal one last.
            with open(_POINTS_LOG, "a", buffering=1) as log:
                log.write(name + "\n")
                log.flush()
        if number == _CRASH_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def create_new_file(path: Path, mode: int = 0o600) -> int:
    """A writable fd of a file created here and now: FileExistsError if anything (a
    file, a symlink, even a dangling one) is already at `path`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, mode)


def _write_all(fd: int, data: bytes) -> None:
    """Write everything: os.write may write less than asked (a signal, a full pipe)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_directory(path: Path) -> None:
    """Make the names in directory `path` (a creation, a rename) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        point("directory fsync")
        os.fsync(fd)
    finally:
        os.close(fd)


def append_and_sync(fd: int, data: bytes) -> None:
    """Append `data` to the O_APPEND file `fd` and fdatasync it: durable on return.
    One point before the writes (however many os.write takes), so that a run passes the
    same points each time."""
    point("append write")
    _write_all(fd, data)
    point("append fdatasync")
    os.fdatasync(fd)


def write_new_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` (never over anything: see `create_new_file`) holding `data`, and
    make both the content and the name durable."""
    _write_and_fsync(create_new_file(path, mode), path, data, "new file")
    fsync_directory(path.parent)


def write_atomically(path: Path, data: bytes, *, label: str = "atomic",
                     exclusive: bool = False) -> None:
    """Write, fsync, rename over `path`, fsync the directory: after a crash at any
    point, `path` holds either its old content or `data`, never a mix. The points are
    named `label` write, fsync and rename. `exclusive`: the temp file `path`.new is
    created here and now (FileExistsError if anything is there), for a directory whose
    owner removed it first; else a `.new` left by a crash is ours and stale."""
    tmp = path.with_name(path.name + ".new")
    if exclusive:
        fd = create_new_file(tmp)
    else:
        # O_TRUNC, not O_EXCL; O_NOFOLLOW: a symlink planted there must not redirect
        # the write.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    _write_and_fsync(fd, tmp, data, label)
    point(f"{label} rename")
    os.rename(tmp, path)
    fsync_directory(path.parent)


def _write_and_fsync(fd: int, path: Path, data: bytes, label: str) -> None:
    """Fill the new file `path` open as `fd` and fsync it, then close it; on any
    failure `path` is removed: a full disk keeps no half-written copy."""
    try:
        point(f"{label} write")
        _write_all(fd, data)
        point(f"{label} fsync")
        os.fsync(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
