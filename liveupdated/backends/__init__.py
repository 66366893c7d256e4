"""Kernel backends: where preserved fds go at reboot and come back from after it.

Both follow the shape of the kernel's Live Update Orchestrator: sessions, fds under
tokens, a reboot that hands everything over, retrieval by the next boot, and finish.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from liveupdated.core.orchestrator import FdEntry

Key = tuple[str, str]  # (session, token)


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
    find_handover runs in a worker thread and may block.
    """

    name: str

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

    def retrieve_fd(self, key: Key, entry: FdEntry) -> int:
        """After the reboot: rebuild the fd; Corrupted if its data fails its checks."""

    def finish_session(self, session: str, released: Sequence[str]) -> None:
        """After the reboot: this session is done; drop what it never retrieved."""

    def finish(self) -> None:
        """The update is over: release everything the previous boot handed over."""
