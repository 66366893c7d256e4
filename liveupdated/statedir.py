"""The state dir at start-up: created or checked, locked for this daemon alone.

`open_state(config)` is the one call. It creates the state dir and the handover area
(mode 0700; missing parents 0755, as `mkdir -p` with the usual umask would make them:
they are only traversed, and /var/lib or ~/.local/state already exist where it
matters), refuses an existing one that another could tamper with, and takes an
exclusive flock on `<state>/lock`, which then holds the daemon's pid.

Exit statuses (sysexits.h), for main() and for the unit's RestartPreventExitStatus=,
which lists the permanent ones (2, 73, 78):

- 2  EX_USAGE: bad command line (argparse).
- 69 EX_UNAVAILABLE: no D-Bus at the given address; it may come back: restarted.
- 73 EX_CANTCREAT: the disk refused a write (read-only, full, I/O error, no access)
  and no fds are held: nothing is lost by failing, and a restart loop would not help.
- 75 EX_TEMPFAIL: another liveupdated holds the state dir, another process owns the bus
  name org.liveupdate1 (name_taken: the line names its pid), or the disk refused a write
  while fds from the fd store are held and the daemon cannot run without a journal:
  restarted, so that systemd keeps the fd store (a unit that fails loses it).
- 78 EX_CONFIG: the state dir or handover area is unusable (not a directory, a
  symlink, another's, group/other-writable, on /proc), the bus address is invalid, or
  the backend named by --backend cannot be served on this host (Config.unserved_backend:
  kernel without /dev/liveupdate, fdstore where PID 1 cannot carry the unit's store).
- 1  anything else: a crash; restarted.

When fds from the fd store are held (LISTEN_FDS for this pid), a refused write never
stops the start: open_state returns a StateDir with `writable` False and `problem`
saying why, and the daemon must go on degraded, since the fd store may be the only copy
of a VM's memory. Nor does a backend the host cannot serve: it is logged as critical and
the start goes on (the fdstore backend then refuses Prepare; the kernel backend cannot
open its device and the daemon exits 1, restarted with its fd store).
"""

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from liveupdated.config import Config
from liveupdated.durable import STORAGE_ERRNOS, describe

if TYPE_CHECKING:
    from dbus_fast.aio import MessageBus

log = structlog.get_logger("liveupdated")

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_CANTCREAT = 73
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78

LOCK_NAME = "lock"
DIR_MODE = 0o700
PARENT_MODE = 0o755


class StateDirError(Exception):
    """Start-up cannot go on: `message` is the one line to print, `exit_status` the code."""

    def __init__(self, exit_status: int, message: str) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.message = message


@dataclass(eq=False)
class StateDir:
    """The locked state dir. `writable` False: the disk refused a write (`problem` says
    how) and fds are held, so the daemon runs degraded instead of exiting."""

    path: Path
    handover: Path | None  # the simulated backend's area, checked and created
    writable: bool = True
    problem: str = ""
    holds_fds: bool = False
    lock_fd: int = field(default=-1, repr=False)  # O_CLOEXEC, open for the process's life

    def close(self) -> None:
        """Release the lock (tests; a daemon keeps it until it exits)."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def holds_listen_fds() -> bool:
    """Did systemd pass this process fds from its fd store? (Read, not taken.)"""
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    return pid.isdigit() and int(pid) == os.getpid() and count.isdigit() and int(count) > 0


def open_state(config: Config) -> StateDir:
    """Create or check the state dir (and the simulated handover area), lock it.

    Raises StateDirError for what must stop the start; returns a StateDir that is not
    `writable` when the disk refused a write but fds are held (see the module doc)."""
    state = StateDir(config.state_dir, None, holds_fds=holds_listen_fds())
    unserved = config.unserved_backend()
    if unserved and not state.holds_fds:
        raise StateDirError(EXIT_CONFIG, unserved)
    if unserved:  # the fds come first: a unit that stops for good may lose its store
        log.critical("backend_unavailable", problem=unserved,
                     hint="fds from the fd store are held: starting anyway; fix the "
                          "configuration and restart the daemon")
    problems: list[str] = []
    try:
        try:
            ensure_dir(config.state_dir, "state dir")
            state.lock_fd = _lock(config.state_dir)
        except _Refused as refused:
            problems.append(refused.message)
        if config.resolved_backend() == "simulated":
            try:
                ensure_dir(config.handover_area, "handover area")
                state.handover = config.handover_area
            except _Refused as refused:
                problems.append(refused.message)
        if problems and not state.holds_fds:
            raise StateDirError(EXIT_CANTCREAT, problems[0])
        if problems:
            state.writable = False
            state.problem = "; ".join(problems)
            if state.lock_fd < 0:
                state.lock_fd = _lock_read_only(config.state_dir)
    except BaseException:
        state.close()
        raise
    return state


class _Refused(Exception):
    """The disk refused a write: fatal unless fds are held."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _failed(what: str, path: Path, exc: OSError) -> Exception:
    message = f"{what} {path}: {describe(exc)}"
    if exc.errno in STORAGE_ERRNOS:
        return _Refused(message)
    return StateDirError(EXIT_CONFIG, message)


def ensure_dir(path: Path, what: str) -> None:
    """Make `path` a directory of ours, mode 0700 if created here; refuse one that is a
    symlink or not a directory, another uid's, or group/other-writable. Raises
    StateDirError (EX_CONFIG) or _Refused (the disk refused to create it)."""
    if not path.is_absolute():
        raise StateDirError(EXIT_CONFIG, f"{what} {path}: not an absolute path")
    if _is_pseudo_fs(path):
        raise StateDirError(
            EXIT_CONFIG, f"{what} {path} is on a pseudo file system (/proc, /sys), not storage"
        )
    created = False
    try:
        _make_parents(path.parent)
        os.mkdir(path, DIR_MODE)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise _failed(what, path, exc) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _says_which(path, what)
        raise _failed(what, path, exc) from None
    try:
        st = os.fstat(fd)
        if created and stat.S_IMODE(st.st_mode) != DIR_MODE:  # a umask took bits off
            os.fchmod(fd, DIR_MODE)
            st = os.fstat(fd)
        _check(path, st, what)
    except OSError as exc:
        raise _failed(what, path, exc) from None
    finally:
        os.close(fd)


def _says_which(path: Path, what: str) -> None:
    """Open refused with ELOOP or ENOTDIR: a symlink, or not a directory?"""
    try:
        st = os.lstat(path)
    except OSError:
        return
    _check(path, st, what)


def _make_parents(path: Path) -> None:
    """`mkdir -p` of the parents, each new one 0755 (subject to the umask)."""
    missing: list[Path] = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for parent in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent, PARENT_MODE)


def _check(path: Path, st: os.stat_result, what: str) -> None:
    problem = ""
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symlink; give the directory itself"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not by this daemon's uid {os.geteuid()}"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = (f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                   f"make it {DIR_MODE:04o}")
    if problem:
        raise StateDirError(EXIT_CONFIG, f"{what} {path} {problem}")


def _is_pseudo_fs(path: Path) -> bool:
    resolved = os.path.realpath(path)
    return any(resolved == top or resolved.startswith(top + "/") for top in ("/proc", "/sys"))


def _lock(state_dir: Path) -> int:
    """The flock on `<state>/lock`, which then holds our pid; its fd (O_CLOEXEC: no child
    inherits it, and it is never offered to the fd store)."""
    path = state_dir / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise _failed("state dir", state_dir, exc) from None
    try:
        _take(fd, path, state_dir)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            raise _failed("state dir", state_dir, exc) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_read_only(state_dir: Path) -> int:
    """Degraded: the lock file opened for reading (flock needs no write access), or, if
    it cannot even be opened, no lock (-1): nothing can be written there anyway."""
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        _take(fd, path, state_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _take(fd: int, path: Path, state_dir: Path) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise StateDirError(
            EXIT_CONFIG, f"state dir {state_dir}: {path} is not a file of this daemon's uid"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise StateDirError(
            EXIT_TEMPFAIL, f"another liveupdated (pid {holder}) holds {state_dir}"
        ) from None


async def name_taken(bus: "MessageBus", name: str) -> StateDirError:
    """EX_TEMPFAIL naming the process that owns `name` on `bus` (GetNameOwner, then its
    GetConnectionUnixProcessID): what a second daemon on the same bus says."""
    from liveupdated.bus import driver

    try:
        (owner,) = await driver.call(bus, "GetNameOwner", "s", name)
        (pid,) = await driver.call(bus, "GetConnectionUnixProcessID", "s", owner)
        who = f"pid {pid}, connection {owner}"
    except LookupError as exc:  # it left in between, or the bus would not say
        who = f"owner not known: {exc}"
    return StateDirError(EXIT_TEMPFAIL, f"{name} is already owned on this bus ({who})")


def startup_failure(exc: BaseException, config: Config, holds_fds: bool) -> StateDirError:
    """What stopped the daemon, as one line and an exit status (see the module doc)."""
    if isinstance(exc, StateDirError):
        return exc
    if _raised_in(exc, os.path.join("liveupdated", "bus", "address.py")):
        if isinstance(exc, ValueError):  # dbus_fast's InvalidAddressError is one
            return StateDirError(EXIT_CONFIG, f"bus address {config.bus!r}: {exc}")
        reason = describe(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
        return StateDirError(EXIT_UNAVAILABLE, f"no D-Bus at {config.bus!r}: {reason}")
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        where = f"{exc.filename}: " if exc.filename else ""
        status = EXIT_TEMPFAIL if holds_fds else EXIT_CANTCREAT
        return StateDirError(status, f"{where}{describe(exc)}")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return StateDirError(1, f"{where}{describe(exc)}")
    frame = _last_frame(exc)
    return StateDirError(1, f"{type(exc).__name__}: {exc}{frame}")


def _raised_in(exc: BaseException, file_suffix: str) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(file_suffix):
            return True
        tb = tb.tb_next
    return False


def _last_frame(exc: BaseException) -> str:
    """` (at file:line)` of where it was raised: the one line still says where."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
