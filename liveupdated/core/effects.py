"""What a command asks of the world, one type per kind of effect.

A command's plan (core/commands.py) yields these and gets each one's outcome back (or
has its failure raised at the yield). The service carries them out, each by one entry
of its table, and decides nothing: every rule about what follows an outcome is in the
plan. Effects hold plain values: keys, fds, records, sizes.

Two kinds. Most are carried out at once, without an await (holding an fd, a dup, a log
line); `ASYNC` ones take an await (the journal, systemd, the backend's threads, a wait).
Plans waiting on equal effects of `SHARED` types at the same time share one (a group
commit: every PreserveFd decided in one turn of the loop waits on one flush).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from liveupdated.core.orchestrator import FdEntry, Follow
from liveupdated.core.records import Record
from liveupdated.core.recovery import Key


class Effect:
    """Base of every effect; the outcome type is in each class's docstring."""


class Refused(Exception):
    """The disk or the backend refused an effect (an OSError), described for the reply:
    a Flush, Rewrite, Compact, WriteHandover or DiscardHandover answers with it."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


# ---- the journal and systemd's fd store ----------------------------------------------


@dataclass(frozen=True)
class Enqueue(Effect):
    """Add records to the journal's next group commit. -> None"""

    records: tuple[Record, ...]


@dataclass(frozen=True)
class Flush(Effect):
    """Everything enqueued so far written and fsynced. -> None; raises Refused."""


@dataclass(frozen=True)
class StoreBarrier(Effect):
    """systemd has taken every fd sent to its store so far (BARRIER=1). -> None"""


@dataclass(frozen=True)
class Rewrite(Effect):
    """The journal written anew as the core's snapshot. -> int: the serial the snapshot
    covered (every decision up to it is durable); raises Refused."""


@dataclass(frozen=True)
class Compact(Effect):
    """The journal compacted to the core's snapshot. -> int, as Rewrite; raises Refused."""


# ---- the fds the daemon holds ---------------------------------------------------------


@dataclass(frozen=True)
class Inspect(Effect):
    """The facts of each fd (a memfd's size, seals, identity), in order; the error
    names the token when several are given. -> tuple[FdFacts, ...]; UnsupportedFd."""

    fds: tuple[tuple[str, int], ...]  # (token, fd)


@dataclass(frozen=True)
class CloseFds(Effect):
    """Close fds handed over with a call that is refused. -> None"""

    fds: tuple[int, ...]


@dataclass(frozen=True)
class Hold(Effect):
    """Keep each fd under its key, and in systemd's fd store. -> None"""

    fds: tuple[tuple[Key, int], ...]


@dataclass(frozen=True)
class LetGo(Effect):
    """The fds that `records` (decided up to `serial`) release leave the fd store now;
    each is closed once its release is durable (`undoable`) or at once. -> None"""

    records: tuple[Record, ...]
    serial: int
    undoable: bool = True


@dataclass(frozen=True)
class CloseReleased(Effect):
    """Close the fds whose release is durable now (decided up to `serial`). -> None"""

    serial: int


@dataclass(frozen=True)
class FollowUndo(Effect):
    """The held fds follow decisions taken back: ("unpreserved", key) lets its fd go,
    ("unreleased", key) holds it again. -> None"""

    changes: tuple[Follow, ...]


@dataclass(frozen=True)
class Unheld(Effect):
    """Which of these keys hold no fd. -> tuple[Key, ...]"""

    keys: tuple[Key, ...]


@dataclass(frozen=True)
class Dup(Effect):
    """A new fd for each key, in order, all or none. -> list[int]"""

    keys: tuple[Key, ...]


@dataclass(frozen=True)
class Release(Effect):
    """Close the fd held under `key` and drop it from the store. -> None"""

    key: Key


@dataclass(frozen=True)
class ReleaseSpares(Effect):
    """Close the old boot's own fds kept as spares (of one session, or all). -> None"""

    session: str | None = None


@dataclass(frozen=True)
class Sizes(Effect):
    """The size of each fd held for a live fd entry now. -> dict[Key, int]"""


# ---- restores after the reboot ----------------------------------------------------------


@dataclass(frozen=True)
class TakeCarried(Effect):
    """A dup of each fd the fd store carried kept under its key (not stored again).
    -> dict[Key, tuple[int, int]]: (st_dev, st_ino) of each newly kept."""

    entries: tuple[tuple[Key, FdEntry], ...]


@dataclass(frozen=True)
class Restore(Effect):
    """Rebuild the fds from the handover, or wait for those rebuilt ahead. -> None;
    raises the first failure (Corrupted)."""

    entries: tuple[tuple[Key, FdEntry], ...]


@dataclass(frozen=True)
class Claim(Effect):
    """Keep each rebuilt fd under its key. -> dict[Key, tuple[int, int] | None]: the
    (st_dev, st_ino) of each newly kept, None where an fd was already held, no entry
    where none was rebuilt."""

    keys: tuple[Key, ...]


@dataclass(frozen=True)
class RestoreAhead(Effect):
    """Rebuild these fds in this order, ahead of the calls that will want them. -> None"""

    entries: tuple[tuple[Key, FdEntry], ...]


@dataclass(frozen=True)
class SettleRestores(Effect):
    """Wait for rebuilds of fds let go (of one session, or all) to end. -> None"""

    session: str | None = None


# ---- the backend ------------------------------------------------------------------------


@dataclass(frozen=True)
class RebootCounts(Effect):
    """systemd's reboot counts, where the backend rests on them. -> RebootCounts | None"""


@dataclass(frozen=True)
class BootFacts(Effect):
    """This boot's id and PID 1's start time. -> tuple[str, int | None]"""


@dataclass(frozen=True)
class PrepareHandover(Effect):
    """The backend's brownout work on every held fd. -> None; raises its failure."""


@dataclass(frozen=True)
class WriteHandover(Effect):
    """The handover for the next kernel written. -> int bytes carried; raises Refused
    for an OSError, the backend's own error otherwise."""


@dataclass(frozen=True)
class DiscardHandover(Effect):
    """Every trace of a (partial) handover removed. -> None; raises Refused."""


@dataclass(frozen=True)
class BackendFinishSession(Effect):
    """The backend lets go of what `session` never retrieved. -> None"""

    session: str
    released: tuple[str, ...]


@dataclass(frozen=True)
class BackendFinish(Effect):
    """The backend lets go of everything the previous boot handed over. -> None"""


# ---- waits, and who hears of it ---------------------------------------------------------


@dataclass(frozen=True)
class Deadline(Effect):
    """The loop's time `seconds` from now. -> float"""

    seconds: float


@dataclass(frozen=True)
class WaitChange(Effect):
    """Until the core's state changes (a record is announced, a command ends) or the
    deadline passes. -> bool: True if it changed."""

    deadline: float | None = None


@dataclass(frozen=True)
class Announce(Effect):
    """Tell listeners (signals, properties, STATUS=) of durable records. -> None"""

    records: tuple[Record, ...]


@dataclass(frozen=True)
class FreezeStarted(Effect):
    """Tell the VMMs that asked to quiesce that Freeze is waiting for them. -> None"""


@dataclass(frozen=True)
class RebootNotFollowed(Effect):
    """Tell listeners that the reboot failed, and why. -> None"""

    reason: str


@dataclass(frozen=True)
class Notify(Effect):
    """sd_notify fields for systemd. -> None"""

    fields: tuple[str, ...]


@dataclass(frozen=True)
class Log(Effect):
    """One structured log line. -> None"""

    level: str
    event: str
    fields: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class LogRestored(Effect):
    """Fds restored for a caller, logged with others restored within a moment. -> None"""

    session: str
    restored: Mapping[str, int] = field(hash=False)  # token -> bytes


@dataclass(frozen=True)
class WriteRestoredLog(Effect):
    """The restored fds logged so far written out now. -> None"""


ASYNC: frozenset[type[Effect]] = frozenset({
    Flush, StoreBarrier, Rewrite, Compact, Restore, SettleRestores, RebootCounts,
    PrepareHandover, WriteHandover, DiscardHandover, BackendFinishSession, BackendFinish,
    WaitChange,
})
SHARED: frozenset[type[Effect]] = frozenset({Flush, StoreBarrier, Rewrite})
