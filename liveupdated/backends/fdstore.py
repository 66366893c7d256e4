"""The fdstore backend: systemd itself carries the fds, in this unit's fd store.

liveupdated already keeps every held fd in its fd store (FDNAME=session/token). With
`FileDescriptorStorePreserve=yes`, systemd 254 and later keep that store across
`systemctl soft-reboot` (the userspace is replaced, the kernel stays: a simulated kexec),
and systemd 261 and later on a kernel with the Live Update Orchestrator across
`systemctl kexec` too. So nothing is copied and /dev/liveupdate is never opened here: at
Reboot the backend only checks that the store will be kept and that every fd is of a kind
the carrier takes (a memfd, not hugetlb), then PID 1 is asked to reboot. After the reboot
the very same files come back in LISTEN_FDS; recovery hands those of the old boot to this
backend (`adopt`), RetrieveFd gets a dup of one, and Finish releases what no one took.

A new boot is recognised on evidence: the Manager's SoftRebootsCount or KExecCount grew
since Reboot recorded them (core.is_new_boot), or the boot id changed.
"""

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

from liveupdated.backends import UNKNOWN_BOOT, Handover, Key, RebootCounts, luo_uapi
from liveupdated.core.errors import (
    Corrupted,
    NoSuchToken,
    QuotaExceeded,
    UnsupportedFd,
    WrongState,
)
from liveupdated.core.orchestrator import FdEntry
from liveupdated.fds import memfd
from liveupdated.systemd import Pid1Error, fd_name, pid1, systemd_version

log = structlog.get_logger("liveupdated")

# What systemd says of a unit whose store outlives a stop, a soft-reboot or a kexec.
PRESERVE_PROPERTY = "FileDescriptorStorePreserve"
KEEPS_STORE = "yes"
COUNTS = ("SoftRebootsCount", "KExecCount")


class FdStoreBackend:
    name = "fdstore"
    keeps_fd_store = True  # the carried fds come back in LISTEN_FDS, not from here
    restores_ahead = False  # retrieve_fd is a dup: nothing to do ahead
    kexec_in_process = False  # PID 1 holds the fds: `kexec` is asked of it over D-Bus
    stores_own_fds = False

    def __init__(
        self,
        forget_stored: Callable[[str], None] = lambda name: None,
        *,
        kexec: bool = False,
        inherited: Sequence[str] | None = None,
    ) -> None:
        # The names systemd passed (LISTEN_FDNAMES), taken by recovery before this looks.
        self._inherited = inherited
        # FDSTOREREMOVE=1 for a name: what Finish does to the fds no one retrieved.
        self._forget_stored = forget_stored
        # The reboot is systemd's kexec (not a soft-reboot): a kernel must be loaded, or
        # systemd-shutdown fails the kexec ("Invalid argument") and reboots plainly, and
        # every fd store, the VMs' memory, is lost.
        self._kexec = kexec
        self._carried: dict[Key, int] = {}

    # ---- before the reboot ---------------------------------------------------------

    def reboot_counts(self) -> RebootCounts | None:
        """systemd's SoftRebootsCount and KExecCount now; None if it cannot say. At
        start-up the answer of the exchange that chose this backend is taken (a second
        connection to PID 1 sat on the blackout path); the counts cannot change while
        this daemon runs, as a soft-reboot or kexec stops it."""
        found_at_start = _AT_START.pop("counts", None)
        if found_at_start is not None:
            return _counts(found_at_start)
        try:
            found = pid1(manager_props=COUNTS)
        except Pid1Error as exc:
            log.warning("reboot_counts_unknown", error=str(exc))
            return None
        return _counts(found)

    def check_carried(self, fds: Mapping[Key, int]) -> None:
        """Will systemd carry these? The unit must keep its store, and every fd must be
        a memfd (not hugetlb): the kind a LUO kexec can take. WrongState/UnsupportedFd."""
        try:
            preserve = pid1(unit_props=(PRESERVE_PROPERTY,)).get(PRESERVE_PROPERTY)
        except Pid1Error as exc:
            raise WrongState(f"cannot ask systemd whether it keeps the fd store: {exc}") from exc
        if preserve != KEEPS_STORE:
            raise WrongState(
                f"the unit has {PRESERVE_PROPERTY}={preserve or 'unsupported'}: systemd "
                f"would not carry its fd store across the reboot (set it to {KEEPS_STORE}, "
                "systemd 254 or later)"
            )
        for (session, token), fd in fds.items():
            try:
                memfd.inspect(fd)
            except UnsupportedFd as exc:
                raise UnsupportedFd(f"{session}/{token} cannot be carried: {exc}") from None
        check_pid1_can_hold(len(fds), pid1_fd_limit())

    def prepare_handover(self, fds: Mapping[Key, int], entries: Mapping[Key, FdEntry]) -> None:
        """Brownout: find out now, while the VMs still run, whether systemd will carry them."""
        self.check_carried(fds)

    def write_handover(
        self,
        fds: Mapping[Key, int],
        entries: Mapping[Key, FdEntry],
        boot_id: str,
        progress: Callable[[int], None],
    ) -> int:
        """Nothing to write: every fd is in the fd store already. Checked once more (the
        unit may have been changed since Prepare); returns the bytes systemd carries."""
        self.check_carried(fds)
        if self._kexec and not luo_uapi.kexec_loaded():
            raise WrongState(
                "no kexec kernel is loaded (/sys/kernel/kexec_loaded is 0): systemd would "
                "reboot without kexec and lose every fd store; load the next kernel first "
                "(kexec -s -l KERNEL --reuse-cmdline)"
            )
        missing = set(entries) - set(fds)
        if missing:
            session, token = sorted(missing)[0]
            raise Corrupted(f"{session}/{token} is journaled but its fd is not held")
        total = sum(entry.size for entry in entries.values())
        progress(total)
        return total

    def discard_handover(self) -> None:
        """Nothing was written: a Cancel leaves the fds in the store, held as before."""

    # ---- after the reboot ------------------------------------------------------------

    def find_handover(self) -> Handover | None:
        """The fd store is the handover: which names came back (LISTEN_FDNAMES, read but
        left for recovery to take). Its boot is the journal's: RebootStarted has it."""
        names = self._inherited
        if names is None:
            names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        keys = frozenset(
            (session, token)
            for session, _, token in (name.partition("/") for name in names if "/" in name)
        )
        return Handover(boot_id=UNKNOWN_BOOT, keys=keys)

    def handover_area(self) -> Path | None:
        """PID 1 carries the fds themselves: nothing is written to disk."""
        return None

    def adopt(self, key: Key, fd: int) -> None:
        """Recovery in UPDATED: an fd the old boot held, carried by systemd, not yet
        retrieved. It stays in the fd store under its name until Finish."""
        old = self._carried.pop(key, None)
        if old is not None:
            os.close(old)
        self._carried[key] = fd

    def carried(self) -> frozenset[Key]:
        return frozenset(self._carried)

    def carried_size(self, key: Key) -> int | None:
        """Its retrieve_fd is a dup, whatever the size: nothing to keep off the loop."""
        return 0 if key in self._carried else None

    def retrieve_fd(self, key: Key, entry: FdEntry) -> int:
        """A dup of the very file the old boot held (the daemon keeps it in the store under
        the same name: systemd drops the duplicate)."""
        fd = self._carried.get(key)
        if fd is None:
            raise NoSuchToken(
                f"{key[0]}/{key[1]} did not come back in the fd store: systemd did not carry it"
            )
        size = os.fstat(fd).st_size
        if size != entry.size and entry.seals & _SIZE_SEALS:
            raise Corrupted(f"{key[0]}/{key[1]} has {size} bytes, its record says {entry.size}")
        return os.dup(fd)

    def finish_session(self, session: str, released: Sequence[str]) -> None:
        for token in released:
            self._release((session, token))

    def finish(self) -> None:
        for key in list(self._carried):
            self._release(key)

    def _release(self, key: Key) -> None:
        fd = self._carried.pop(key, None)
        if fd is None:
            return
        self._forget_stored(fd_name(*key))
        with contextlib.suppress(OSError):
            os.close(fd)


# PID 1 copies every fd of every store to hand it to the next userspace (soft-reboot) or
# kernel (LUO kexec): it needs twice the stored fds under its own RLIMIT_NOFILE. Past it,
# the copy fails and PID 1 gives up: every store, the VMs' memory, is lost (seen with
# 10,000 fds in a container whose PID 1 had a limit of 20,000). Room is kept for the
# daemon's own entries, other units' stores and PID 1's own fds.
PID1_SPARE_FDS = 4096


def pid1_fd_limit(limits: str = "/proc/1/limits") -> int | None:
    """PID 1's soft limit of open files; None if it cannot be read or is unlimited."""
    try:
        with open(limits) as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return int(soft) if soft.isdigit() else None
    except OSError:
        return None
    return None


def check_pid1_can_hold(stored: int, limit: int | None) -> None:
    """QuotaExceeded if PID 1 could not copy `stored` fds (and the rest) at the reboot."""
    if limit is None:
        return
    needed = 2 * stored + PID1_SPARE_FDS
    if needed > limit:
        raise QuotaExceeded(
            f"PID 1 may hold {limit} open files; carrying {stored} stored fds across the "
            f"reboot needs about {needed} (it copies each): the stores would be lost. Raise "
            "systemd's DefaultLimitNOFILE= / PID 1's limit, or carry fewer fds"
        )


# A memfd sealed against growing and shrinking cannot change size: a different size is
# damage. Any other memfd may have been resized by its VMM before Freeze.
_SIZE_SEALS = 0x0004 | 0x0008  # F_SEAL_SHRINK | F_SEAL_GROW


SOFT_REBOOT_SINCE = 254  # FileDescriptorStorePreserve= and soft-reboot carrying the store
LUO_KEXEC_SINCE = 261  # the store carried across kexec on a Live Update Orchestrator kernel


# systemd's counts as the start-up's one exchange with PID 1 read them (see reboot_counts).
_AT_START: dict[str, dict[str, object]] = {}


def _counts(found: dict[str, object]) -> RebootCounts:
    soft, kexecs = (found.get(name) for name in COUNTS)
    return RebootCounts(
        soft_reboots=soft if isinstance(soft, int) else None,
        kexecs=kexecs if isinstance(kexecs, int) else None,
    )


def pid1_carries_fds(kexec: bool) -> bool:
    """Can PID 1 carry this unit's fd store across the reboot (a kexec on a LUO kernel
    when `kexec`, else a soft-reboot)? By capability: this unit keeps its store
    (FileDescriptorStorePreserve=yes, a property systemd < 254 does not have) and
    systemd's Version is recent enough. False off systemd or without an answer."""
    try:
        found = pid1(manager_props=("Version", *COUNTS), unit_props=(PRESERVE_PROPERTY,))
    except Pid1Error as exc:
        log.info("fdstore_backend_unavailable", reason=str(exc))
        return False
    _AT_START["counts"] = found
    version = systemd_version(str(found.get("Version", "")))
    needed = LUO_KEXEC_SINCE if kexec else SOFT_REBOOT_SINCE
    if found.get(PRESERVE_PROPERTY) != KEEPS_STORE or version < needed:
        log.info("fdstore_backend_unavailable", systemd=version, needs=needed,
                 preserve=found.get(PRESERVE_PROPERTY, "unsupported"))
        return False
    return True
