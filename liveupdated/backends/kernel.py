"""The real kernel backend: Live Update Orchestrator sessions on /dev/liveupdate.

Each liveupdated session becomes a kernel session of the same name and its fds kernel
tokens 1..n; token 0 is a sealed manifest memfd recording what the kernel does not keep
(token strings, requires, names, seals). The kernel cannot list sessions, so an index
session, `liveupdated:index` (a name no liveupdated session can have), names them for the
next boot. Guest memory is never copied, before the kexec or after it: the kernel carries
the pages, and a memfd comes back as the kernel restores it (nameless, every page
allocated); the name it had is in the journal (Session.FdNames).
"""

import errno
import fcntl
import mmap
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import structlog

from liveupdated.backends import Handover, Key, luo_uapi
from liveupdated.core.codec import DecodeError, from_json, to_json
from liveupdated.core.errors import (
    Corrupted,
    InvalidArgument,
    LiveUpdateError,
    NoSuchSession,
    NoSuchToken,
    QuotaExceeded,
    SessionExists,
    TokenExists,
    UnsupportedFd,
    WrongState,
)
from liveupdated.core.orchestrator import FdEntry
from liveupdated.fds import memfd
from liveupdated.systemd import Pid1Error, pid1, systemd_version, under_systemd
from liveupdated.systemd import boot_id as current_boot_id

log = structlog.get_logger("liveupdated")

INDEX_SESSION = "liveupdated:index"
STORE_PREFIX = "@luo/"  # fd store names of retrieved kernel sessions and their manifests


def session_store_name(session: str) -> str:
    return f"{STORE_PREFIX}{session.replace(':', '.')}"  # FDNAME may not hold ':'


def manifest_store_name(session: str) -> str:
    return f"{session_store_name(session)}/manifest"
MANIFEST_TOKEN = 0
MANIFEST_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
HOLDER_ARGV0 = "@liveupdated-luo-holder"  # '@': systemd-shutdown does not kill it
HOLDER_START_TIMEOUT = 10.0
HOLDER_STOP_TIMEOUT = 5.0
# systemd-shutdown of this version and later preserves every unit's fd store through LUO
# itself: it must open /dev/liveupdate, which a holder would keep busy (every store lost).
PID1_PRESERVES_SINCE = 261
_SCAN_CHUNK = 1 << 20
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True, slots=True, kw_only=True)
class CarriedFd:
    token: str
    kernel_token: int
    kind: str
    requires: tuple[str, ...]
    name: str
    seals: int
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """Token 0 of every kernel session."""

    version: Literal[1] = 1
    session: str
    boot_id: str
    fds: tuple[CarriedFd, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Index:
    """Token 0 of the index session: the old boot and the sessions it handed over."""

    version: Literal[1] = 1
    boot_id: str
    sessions: tuple[str, ...]


R = TypeVar("R", Manifest, Index)


@dataclass
class Incoming:
    """A kernel session handed over by the previous boot, retrieved by this one."""

    fd: int
    manifest: Manifest


# ---- errno -> contract error ------------------------------------------------------------

_COMMON: dict[int, type[LiveUpdateError]] = {
    errno.ENOMEM: QuotaExceeded,
    errno.ENOSPC: QuotaExceeded,
    errno.EFBIG: QuotaExceeded,
    errno.EMFILE: QuotaExceeded,
    errno.EIO: Corrupted,
    errno.EBADF: InvalidArgument,
    errno.EINVAL: InvalidArgument,
}


def kernel_error(
    exc: OSError, what: str, by_errno: Mapping[int, type[LiveUpdateError]] | None = None
) -> LiveUpdateError:
    """The contract error for a failed LUO call, naming the call and the kernel's errno."""
    code = exc.errno or 0
    cls = (by_errno or {}).get(code) or _COMMON.get(code, WrongState)
    name = errno.errorcode.get(code, str(code))
    return cls(f"{what}: the kernel answered {name} ({os.strerror(code)})")


def open_device(path: str = luo_uapi.DEVICE) -> int:
    """The device; a holder left by an earlier daemon whose kexec never came (a failed
    reboot action, a crash after Reboot) is stopped first: its sessions are unpreserved,
    as a restart in FROZEN discards the handover anyway, and the fds are still held."""
    try:
        return luo_uapi.open_device(path)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            stop_holders(holder_pids(path))
    return _open_device(path)


def _open_device(path: str) -> int:
    try:
        return luo_uapi.open_device(path)
    except FileNotFoundError:
        raise WrongState(
            f"no {path}: boot a kernel with CONFIG_LIVEUPDATE and liveupdate=on, "
            "or run with --backend simulated"
        ) from None
    except OSError as exc:
        error = kernel_error(exc, f"opening {path}")
        if exc.errno == errno.EBUSY:
            error = WrongState(f"{error}; another process holds it (one opener at a time)")
        raise error from exc


# ---- memfds in and out of the kernel ----------------------------------------------------


def _write_sealed(name: str, data: bytes) -> int:
    fd = memfd.create(name, len(data))
    try:
        os.pwrite(fd, data, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MANIFEST_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def holder_pids(device: str = luo_uapi.DEVICE) -> list[int]:
    """The session holders (argv[0] `@liveupdated-luo-holder`) holding `device` open."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _cmdline(int(entry)).startswith(
                HOLDER_ARGV0.encode() + b"\0"):
            continue
        try:
            links = [os.readlink(f"/proc/{entry}/fd/{n}")
                     for n in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        if os.path.realpath(device) in links:
            found.append(int(entry))
    return found


def stop_holders(pids: Sequence[int]) -> list[int]:
    """SIGKILL these holders and wait until they are gone; the pids stopped. Their
    session fds close with them: the kernel unpreserves the sessions."""
    stopped = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        stopped.append(pid)
        log.warning("kernel_session_holder_stopped", pid=pid,
                    reason="no kexec came after Reboot: its sessions are discarded")
    deadline = time.monotonic() + HOLDER_STOP_TIMEOUT
    while any(_alive(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.01)
    return stopped


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie whose fds are already closed)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def pid1_preserves_fd_stores() -> int | None:
    """systemd's version when PID 1 is systemd >= 261, which preserves fd stores through
    LUO in systemd-shutdown (and needs /dev/liveupdate free for it); else None."""
    if not under_systemd():
        return None
    try:
        version = systemd_version(str(pid1(manager_props=("Version",)).get("Version", "")))
    except Pid1Error as exc:
        log.info("systemd_version_unknown", reason=str(exc))
        return None
    return version if version >= PID1_PRESERVES_SINCE else None


def nonzero_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the pages that are not all zero: the kernel allocates every hole
    of a preserved memfd, so a zero page is where a hole was (or may as well be)."""
    extents: list[tuple[int, int]] = []
    if size == 0:
        return extents
    zero_chunk, zero_page = bytes(_SCAN_CHUNK), bytes(_PAGE)
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as view:
        for chunk in range(0, size, _SCAN_CHUNK):
            end = min(chunk + _SCAN_CHUNK, size)
            if view[chunk:end] == zero_chunk[: end - chunk]:
                continue
            for page in range(chunk, end, _PAGE):
                page_end = min(page + _PAGE, size)
                if view[page:page_end] == zero_page[: page_end - page]:
                    continue
                if extents and extents[-1][0] + extents[-1][1] == page:
                    extents[-1] = (extents[-1][0], page_end - extents[-1][0])
                else:
                    extents.append((page, page_end - page))
    return extents


class KernelBackend:
    """Drives /dev/liveupdate; opens it once, at construction, and keeps it.

    `exact_names`: the kernel restores a memfd nameless and with every hole allocated.
    False (the default) hands the kernel's memfd back as it is: no copy; the original
    name stays in the journal for Session.FdNames. True copies it (zero pages left as
    holes) into a memfd of the original name, which needs the memory twice until Finish
    (the kernel keeps its file until then): only for small memfds.
    `holder`: at Reboot, leave the session fds with a process that `systemctl kexec`
    does not kill, so that they outlive the daemon until the kernel's kexec. Refused at
    Prepare where PID 1 preserves fd stores itself (systemd >= 261: use the fdstore
    backend); stopped by Cancel, a failed Reboot and the next start of the daemon.
    """

    name = "kernel"
    keeps_fd_store = False
    restores_ahead = False  # the kernel's retrieve is cheap: each fd when it is asked for
    # The outgoing sessions live in this process's fds: the reboot action `kexec` is the
    # syscall, made from here (`systemctl kexec` is PID 1's, the holder keeping them).
    kexec_in_process = True
    stores_own_fds = True  # the retrieved sessions and manifests, under STORE_PREFIX

    def reboot_counts(self) -> None:
        """No evidence but the boot id (and KexecSimulated)."""
        return None

    def handover_area(self) -> Path | None:
        """The kernel carries the handover in memory: nothing is written to disk."""
        return None

    def adopt(self, key: Key, fd: int) -> None:
        """Never asked: the fds it carries do not come back in the fd store
        (keeps_fd_store is False), so recovery decides no Adopt for it."""
        raise AssertionError(f"the {self.name} backend adopts no fd ({key[0]}/{key[1]})")

    def __init__(
        self,
        device: str = luo_uapi.DEVICE,
        *,
        exact_names: bool = False,
        holder: bool = True,
        store: Callable[[str, int], None] = lambda name, fd: None,
        forget: Callable[[str], None] = lambda name: None,
        adopted: Mapping[str, int] | None = None,
    ) -> None:
        # A retrieved kernel session lives only as long as its fd (closing it finishes the
        # session): each one, and its manifest, is kept in the fd store too (`store`, names
        # under STORE_PREFIX), so that a restart of the daemon in UPDATED loses nothing;
        # the next start hands them back (`adopted`) instead of retrieving them again.
        self._store = store
        self._forget = forget
        self._adopted = dict(adopted or {})
        self._device = open_device(device)
        self.exact_names = exact_names
        self.holder = holder
        self._outgoing: dict[str, int] = {}  # kernel session name -> session fd
        self._prepared: dict[Key, int] = {}  # (session, token) -> kernel token
        self._incoming: dict[str, Incoming] = {}
        # Fds of one session are retrieved on the loop (small) and in threads (large) at
        # once: the kernel session is retrieved by the first, under this lock.
        self._incoming_lock = threading.Lock()
        self._handover: Handover | None = None
        self.holder_process: subprocess.Popen[bytes] | None = None  # kept: it outlives us

    # ---- before the kexec ---------------------------------------------------------------

    def prepare_handover(self, fds: Mapping[Key, int], entries: Mapping[Key, FdEntry]) -> None:
        """Preserve every fd now: the kernel pins (and allocates) its pages, the VMs run on."""
        self._close_outgoing()
        if self.holder:
            self._check_no_pid1_preservation()
        by_session: dict[str, list[str]] = {}
        for session, token in fds:
            by_session.setdefault(session, []).append(token)
        try:
            for session, tokens in sorted(by_session.items()):
                session_fd = self._create_session(session)
                for kernel_token, token in enumerate(sorted(tokens), start=MANIFEST_TOKEN + 1):
                    self._preserve(session_fd, fds[session, token], kernel_token, session, token)
                    self._prepared[session, token] = kernel_token
        except BaseException:
            self._close_outgoing()
            raise
        log.info("kernel_sessions_prepared", sessions=len(by_session), fds=len(fds))

    def write_handover(
        self,
        fds: Mapping[Key, int],
        entries: Mapping[Key, FdEntry],
        boot_id: str,
        progress: Callable[[int], None],
    ) -> int:
        """Blackout: one manifest per session and the index; the pages are already pinned."""
        if not luo_uapi.kexec_loaded():
            raise WrongState(
                "no kexec kernel is loaded (/sys/kernel/kexec_loaded is 0): load the next "
                "kernel (kexec_file_load, e.g. `kexec -s -l`) before Reboot()"
            )
        if set(self._prepared) != set(fds) or INDEX_SESSION in self._outgoing:
            self.prepare_handover(fds, entries)  # the daemon restarted, or a retry
        sessions = sorted({session for session, _ in fds})
        try:
            for session in sessions:
                carried = tuple(
                    CarriedFd(
                        token=token,
                        kernel_token=self._prepared[session, token],
                        kind=entries[session, token].kind,
                        requires=entries[session, token].requires,
                        name=entries[session, token].name,
                        seals=memfd.seals_of(fds[session, token]),
                        size=os.fstat(fds[session, token]).st_size,
                    )
                    for s, token in sorted(fds)
                    if s == session
                )
                manifest = Manifest(session=session, boot_id=boot_id, fds=carried)
                self._preserve_manifest(self._outgoing[session], session, manifest)
            index_fd = self._create_session(INDEX_SESSION)
            self._preserve_manifest(index_fd, INDEX_SESSION,
                                    Index(boot_id=boot_id, sessions=tuple(sessions)))
        except BaseException:
            self._close_outgoing()
            raise
        carried_bytes = sum(os.fstat(fd).st_size for fd in fds.values())
        progress(carried_bytes)
        if self.holder:
            self._spawn_holder()
        log.info("kernel_handover_written", sessions=len(sessions), fds=len(fds),
                 bytes=carried_bytes)
        return carried_bytes

    def discard_handover(self) -> None:
        """Cancel (or a failed Reboot): closing a session fd makes the kernel unpreserve
        its files, once the holder, which has them too, is stopped. A stale handover of
        the previous boot is finished, which releases it."""
        self._stop_holder()
        self._close_outgoing()
        if self._incoming:
            self.finish()

    def _create_session(self, session: str) -> int:
        try:
            session_fd = luo_uapi.create_session(self._device, session)
        except OSError as exc:
            raise kernel_error(exc, f"creating kernel session {session!r}",
                               {errno.EEXIST: SessionExists}) from exc
        self._outgoing[session] = session_fd
        return session_fd

    def _preserve(self, session_fd: int, fd: int, kernel_token: int, session: str,
                  token: str) -> None:
        try:
            luo_uapi.preserve_fd(session_fd, fd, kernel_token)
        except OSError as exc:
            raise kernel_error(exc, f"preserving {session}/{token}", {
                errno.EEXIST: TokenExists,
                errno.ENOENT: UnsupportedFd,  # no kernel handler takes this file
                errno.EOPNOTSUPP: UnsupportedFd,  # e.g. a seal this kernel cannot carry
                errno.EBUSY: UnsupportedFd,  # the same memfd under another token
            }) from exc

    def _preserve_manifest(self, session_fd: int, session: str, record: Manifest | Index) -> None:
        fd = _write_sealed(f"liveupdated-manifest:{session}", to_json(record))
        try:
            self._preserve(session_fd, fd, MANIFEST_TOKEN, session, "<manifest>")
        finally:
            os.close(fd)  # the kernel holds its own reference now

    def _close_outgoing(self) -> None:
        for session_fd in self._outgoing.values():
            os.close(session_fd)
        self._outgoing.clear()
        self._prepared.clear()

    def _check_no_pid1_preservation(self) -> None:
        version = pid1_preserves_fd_stores()
        if version is not None:
            raise WrongState(
                f"systemd {version} preserves fd stores through LUO itself at kexec, and "
                "needs /dev/liveupdate free for it: the kernel backend's session holder "
                "would make it lose every store. Run liveupdated with --backend fdstore "
                "(or auto) on this host"
            )

    def _stop_holder(self) -> None:
        child, self.holder_process = self.holder_process, None
        if child is not None and child.poll() is None:
            stop_holders([child.pid])
        if child is not None:
            child.wait()

    def _spawn_holder(self) -> None:
        """A process holding the device and the session fds until the kexec: `sleep` with
        '@' as the first character of argv[0] (systemd-shutdown's final kill spares it), in
        a scope of its own with KillMode=none when run by systemd (the stop of this service
        spares it). Without it, the daemon's exit would close the sessions."""
        self._stop_holder()  # a retried Reboot: one holder, of the sessions of now
        held = [self._device, *self._outgoing.values()]
        command = ["/bin/bash", "-c", f"exec -a {HOLDER_ARGV0} /bin/sleep infinity"]
        if os.environ.get("INVOCATION_ID"):
            command = ["systemd-run", "--scope", "--quiet", "--collect",
                       "--property=KillMode=none", "--unit=liveupdated-luo-holder", *command]
        try:
            child = subprocess.Popen(command, pass_fds=held, start_new_session=True,
                                     stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise WrongState(f"cannot start the session holder {command[0]}: {exc}") from exc
        deadline = time.monotonic() + HOLDER_START_TIMEOUT
        while not _cmdline(child.pid).startswith(HOLDER_ARGV0.encode()):
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                raise WrongState(f"the session holder ({' '.join(command[:2])}...) did not "
                                 f"start (status {child.returncode}); the kexec would carry "
                                 "nothing")
            time.sleep(0.01)
        self.holder_process = child
        log.info("kernel_sessions_held", pid=child.pid, fds=len(held))

    # ---- after the kexec ----------------------------------------------------------------

    def find_handover(self) -> Handover | None:
        """Retrieve the index session and every session it names; None on a plain boot."""
        if self._handover is not None:
            return self._handover
        try:
            index_fd = self._session_fd(INDEX_SESSION)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise kernel_error(exc, "retrieving the index session") from exc
        try:
            index = self._read_record(index_fd, INDEX_SESSION, Index)
        except Corrupted as exc:  # Finish still releases it: keep the session fd
            self._incoming[INDEX_SESSION] = Incoming(
                index_fd, Manifest(session=INDEX_SESSION, boot_id="unknown", fds=()))
            self._handover = Handover("unknown", frozenset(), damage=str(exc))
            return self._handover
        except BaseException:
            os.close(index_fd)
            raise
        self._incoming[INDEX_SESSION] = Incoming(
            index_fd, Manifest(session=INDEX_SESSION, boot_id=index.boot_id, fds=())
        )
        keys: set[Key] = set()
        for session in index.sessions:
            try:
                incoming = self._retrieve_session(session)
            except LiveUpdateError as exc:
                log.error("kernel_session_lost", session=session, error=exc.name,
                          message=str(exc))
                continue
            keys.update((session, fd.token) for fd in incoming.manifest.fds)
        self._handover = Handover(index.boot_id, frozenset(keys))
        log.info("kernel_handover_found", previous_boot=index.boot_id,
                 sessions=len(index.sessions), fds=len(keys), this_boot=current_boot_id())
        return self._handover

    def _retrieve_session(self, session: str) -> Incoming:
        with self._incoming_lock:
            return self._retrieve_session_once(session)

    def _retrieve_session_once(self, session: str) -> Incoming:
        if session in self._incoming:
            return self._incoming[session]
        try:
            session_fd = self._session_fd(session)
        except OSError as exc:
            raise kernel_error(exc, f"retrieving kernel session {session!r}", {
                errno.ENOENT: NoSuchSession,
                errno.EINVAL: WrongState,  # retrieved already, by an earlier start
            }) from exc
        try:
            manifest = self._read_record(session_fd, session, Manifest)
        except BaseException:
            os.close(session_fd)
            raise
        self._incoming[session] = Incoming(session_fd, manifest)
        return self._incoming[session]

    def _session_fd(self, session: str) -> int:
        """The session's fd: the one an earlier start of this boot kept in the fd store,
        else retrieved from the kernel now (and kept there)."""
        adopted = self._adopted.pop(session_store_name(session), None)
        if adopted is not None:
            return adopted
        fd = luo_uapi.retrieve_session(self._device, session)
        self._store(session_store_name(session), fd)
        return fd

    def _read_record(self, session_fd: int, session: str, model: type[R]) -> R:
        fd = self._adopted.pop(manifest_store_name(session), None)
        if fd is None:  # retrieved once only: kept in the fd store for a restart
            fd = self._retrieve(session_fd, MANIFEST_TOKEN, session, "<manifest>")
            self._store(manifest_store_name(session), fd)
        try:
            return from_json(model, os.pread(fd, os.fstat(fd).st_size, 0))
        except DecodeError as exc:
            raise Corrupted(f"the manifest of kernel session {session!r} fails its checks: "
                            f"{exc}") from exc
        finally:
            os.close(fd)

    def _retrieve(self, session_fd: int, kernel_token: int, session: str, token: str) -> int:
        try:
            return luo_uapi.retrieve_fd(session_fd, kernel_token)
        except OSError as exc:
            raise kernel_error(exc, f"retrieving {session}/{token} from the kernel", {
                errno.ENOENT: NoSuchToken,
                errno.EINVAL: Corrupted,
                errno.EOPNOTSUPP: Corrupted,
            }) from exc

    def carried_size(self, key: Key) -> int | None:
        """From the session's manifest, once an earlier retrieval read it (the kernel
        restores a memfd's pages one by one: a large one is no work for the loop)."""
        incoming = self._incoming.get(key[0])
        if incoming is None:
            return None
        return next((fd.size for fd in incoming.manifest.fds if fd.token == key[1]), None)

    def retrieve_fd(self, key: Key, entry: FdEntry) -> int:
        session, token = key
        try:
            incoming = self._retrieve_session(session)
        except NoSuchSession as exc:
            raise NoSuchToken(f"{session}/{token} is not in the kernel's handover: {exc}") from exc
        carried = next((fd for fd in incoming.manifest.fds if fd.token == token), None)
        if carried is None:
            raise NoSuchToken(f"{session}/{token} is not in the manifest of kernel session "
                              f"{session!r}")
        fd = self._retrieve(incoming.fd, carried.kernel_token, session, token)
        try:
            return self._restore(fd, carried, key)
        except BaseException:
            os.close(fd)
            raise

    def _restore(self, fd: int, carried: CarriedFd, key: Key) -> int:
        """Name and seals as they were: in place where the kernel kept enough, else a copy."""
        size = os.fstat(fd).st_size
        if size != carried.size:
            raise Corrupted(f"{key[0]}/{key[1]} came back with {size} bytes, its manifest "
                            f"says {carried.size}")
        if not self.exact_names or carried.name == "":
            missing = carried.seals & ~memfd.seals_of(fd)
            if missing:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, missing)
            return fd
        copy = memfd.create(carried.name, size)
        try:
            memfd.copy_extents(fd, copy, nonzero_extents(fd, size))
            memfd.finish_restore(copy, os.lseek(fd, 0, os.SEEK_CUR), carried.seals)
        except BaseException:
            os.close(copy)
            raise
        os.close(fd)
        return copy

    def finish_session(self, session: str, released: Sequence[str]) -> None:
        """FINISH the kernel session: the kernel frees whatever was not retrieved."""
        if session in self._incoming:
            self._finish_kernel_session(session)

    def finish(self) -> None:
        """FINISH every session the previous boot handed over; unretrieved fds are freed."""
        self.find_handover()
        failed: list[str] = []
        for session in sorted(self._incoming, key=lambda s: s == INDEX_SESSION):
            try:
                self._finish_kernel_session(session)
            except WrongState as exc:
                failed.append(str(exc))
        if failed:
            raise WrongState("; ".join(failed))
        self._handover = None

    def _finish_kernel_session(self, session: str) -> None:
        incoming = self._incoming[session]
        try:
            luo_uapi.finish_session(incoming.fd)
        except OSError as exc:  # the kernel keeps it; a later Finish may try again
            error = kernel_error(exc, f"finishing kernel session {session!r}")
            raise WrongState(str(error)) from exc
        os.close(incoming.fd)
        del self._incoming[session]
        self._forget(session_store_name(session))
        self._forget(manifest_store_name(session))
