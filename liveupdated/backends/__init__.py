"""Kernel backends: where preserved fds go at reboot and come back from after it.

simulated (a handover area on disk), kernel (/dev/liveupdate) and fdstore (systemd's fd
store, carried by PID 1 across soft-reboot or a LUO kexec). All follow the shape of the
kernel's Live Update Orchestrator: sessions, fds under tokens, a reboot that hands
everything over, retrieval by the next boot, and finish.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from liveupdated.core.orchestrator import FdEntry

# What a key is, and how a handover says it cannot name its boot, are recovery's words.
from liveupdated.core.recovery import UNKNOWN_BOOT as UNKNOWN_BOOT
from liveupdated.core.recovery import Key as Key


class RebootCounts(NamedTuple):
    """systemd's counts of soft-reboots and kexecs since the machine booted (None: this
    systemd does not have the property): a new userspace with the same boot id."""

    soft_reboots: int | None
    kexecs: int | None


@dataclass(frozen=True)
class Handover:
    """What the previous boot handed over, as found at start-up."""

    boot_id: str
    keys: frozenset[Key]
    damage: str | None = None  # the handover exists but fails its checks


class Backend(Protocol):
    """The daemon holds every fd until Prepare; a backend sees them only from then on.

    Called in this order: find_handover at start; prepare_handover (brownout, may be
    slow, the VMs still run); write_handover at Reboot (blackout: minimal work); then
    the kexec. discard_handover undoes the last two on Cancel. After the kexec,
    retrieve_fd rebuilds fds on request and finish ends the update. Every method but
    find_handover, adopt and carried_size runs in a worker thread and may block, but
    retrieve_fd of an fd carried_size calls small, which runs on the event loop.
    """

    # Every member is declared here and defined by every backend, so that the daemon asks
    # a backend what it does instead of probing it (getattr) or switching on its name;
    # `name` is for people (logs, Manager.Backend, Check), never for a decision.
    name: str
    # The fds it carries come back in the fd store (LISTEN_FDS): recovery keeps them, and
    # hands those of the old boot to `adopt`.
    keeps_fd_store: bool
    # retrieve_fd is slow enough (it copies the data) that the service restores every fd
    # ahead, in workers, on the first call after the reboot that needs one; where it is
    # cheap (a dup, the kernel's own retrieve) each fd is restored when asked for.
    restores_ahead: bool
    # With the reboot action `kexec`, the daemon makes the kexec syscall itself once its
    # serve loop ends, from the process that holds the backend's outgoing sessions; False:
    # `kexec` is asked of PID 1 (kexec.target) like any other reboot action.
    kexec_in_process: bool
    # It keeps fds of its own in the fd store (the kernel's retrieved sessions and their
    # manifests, under the daemon's LUO_STORE_PREFIX) and takes them back at the next
    # start; any other backend finds such fds left over and they are closed.
    stores_own_fds: bool

    def reboot_counts(self) -> RebootCounts | None:
        """Evidence for the next start, recorded at Reboot: None if the backend has none."""

    def handover_area(self) -> Path | None:
        """The directory the handover is written to (Check asks its free space), or None
        where the backend writes none to disk."""

    def find_handover(self) -> Handover | None:
        """The previous kernel's handover, if this start is the first of a new boot."""

    def prepare_handover(self, fds: Mapping[Key, int], entries: Mapping[Key, FdEntry]) -> None:
        """Brownout work: whatever can be handed over before the VMs stop."""

    def write_handover(
        self,
        fds: Mapping[Key, int],
        entries: Mapping[Key, FdEntry],
        boot_id: str,
        progress: Callable[[int], None],
    ) -> int:
        """Blocking: serialize every fd for the next kernel; returns bytes carried."""

    def discard_handover(self) -> None:
        """Cancel: remove every trace of a (partial) handover."""

    def adopt(self, key: Key, fd: int) -> None:
        """At start, recovery's Adopt: an fd of the old boot, carried in the fd store, that
        is the handover's copy of `key` (RetrieveFd gets a dup, Finish releases it). Only
        asked of a backend that keeps_fd_store; any other refuses it (a programming error,
        as recovery never decides it)."""

    def carried_size(self, key: Key) -> int | None:
        """After the reboot, without blocking: the size of the fd as the previous boot
        handed it over (a memfd may have grown since PreserveFd), or None if not known."""

    def retrieve_fd(self, key: Key, entry: FdEntry) -> int:
        """After the reboot: rebuild the fd; Corrupted if its data fails its checks."""

    def finish_session(self, session: str, released: Sequence[str]) -> None:
        """After the reboot: this session is done; drop what it never retrieved."""

    def finish(self) -> None:
        """The update is over: release everything the previous boot handed over."""
