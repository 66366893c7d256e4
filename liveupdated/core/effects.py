"""What a command asks of the world, one type per kind of effect.

A command's plan (core/commands.py) yields these and gets each one's outcome back (or
has its failure raised at the yield). The service carries them out, each by one entry
of its table, and decides nothing: every rule about what follows an outcome is in the
plan. Effects hold plain values: keys, fds, records, sizes.

Two kinds. Most are carried out at once, without an await (holding an fd, a dup, a log
line); `ASYNC` ones take an await (the journal, systemd, the backend's threads, a wait).
Plans waiting on effects of a `SHARED` type at the same time share one (a group commit:
every PreserveFd decided in one turn of the loop waits on one flush).

Effects are NamedTuples, not dataclasses: the daemon imports them on the blackout path
(the next boot's start), and a NamedTuple costs a fifth of a frozen dataclass to build.
Two of them compare as tuples, so an effect is told by its type first.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

from liveupdated.core.orchestrator import FdEntry, Follow
from liveupdated.core.records import Record
from liveupdated.core.recovery import Key


class Refused(Exception):
    """The disk or the backend refused an effect (an OSError), described for the reply:
    a Flush, Rewrite, Compact, WriteHandover or DiscardHandover answers with it."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


# ---- the journal and systemd's fd store ----------------------------------------------


class Enqueue(NamedTuple):
    """Add records to the journal's next group commit. -> None"""

    records: tuple[Record, ...]


class Flush(NamedTuple):
    """Everything enqueued so far written and fsynced, then every fd sent to systemd's
    store so far taken by it (BARRIER=1). -> None; raises Refused."""


class StoreBarrier(NamedTuple):
    """systemd has taken every fd sent to its store so far (BARRIER=1). -> None"""


class Rewrite(NamedTuple):
    """The journal written anew as the core's snapshot. -> int: the serial the snapshot
    covered (every decision up to it is durable); raises Refused."""


class Compact(NamedTuple):
    """The journal compacted to the core's snapshot. -> int, as Rewrite; raises Refused."""


# ---- the fds the daemon holds ---------------------------------------------------------


class Inspect(NamedTuple):
    """The facts of each fd (a memfd's size, seals, identity), in order; the error
    names the token when several are given. -> tuple[FdFacts, ...]; UnsupportedFd."""

    fds: tuple[tuple[str, int], ...]  # (token, fd)


class CloseFds(NamedTuple):
    """Close fds handed over with a call that is refused. -> None"""

    fds: tuple[int, ...]


class Hold(NamedTuple):
    """Keep each fd under its key, and in systemd's fd store. -> None"""

    fds: tuple[tuple[Key, int], ...]


class LetGo(NamedTuple):
    """The fds that `records` (decided up to `serial`) release leave the fd store now;
    each is closed once its release is durable (`undoable`) or at once. -> None"""

    records: tuple[Record, ...]
    serial: int
    undoable: bool = True


class CloseReleased(NamedTuple):
    """Close the fds whose release is durable now (decided up to `serial`). -> None"""

    serial: int


class FollowUndo(NamedTuple):
    """The held fds follow decisions taken back: ("unpreserved", key) lets its fd go,
    ("unreleased", key) holds it again. -> None"""

    changes: tuple[Follow, ...]


class Unheld(NamedTuple):
    """Which of these keys hold no fd. -> tuple[Key, ...]"""

    keys: tuple[Key, ...]


class Dup(NamedTuple):
    """A new fd for each key, in order, all or none. -> list[int]"""

    keys: tuple[Key, ...]


class Release(NamedTuple):
    """Close the fd held under `key` and drop it from the store. -> None"""

    key: Key


class ReleaseSpares(NamedTuple):
    """Close the old boot's own fds kept as spares (of one session, or all). -> None"""

    session: str | None = None


class Sizes(NamedTuple):
    """The size of each fd held for a live fd entry now. -> dict[Key, int]"""


# ---- restores after the reboot ----------------------------------------------------------


class TakeCarried(NamedTuple):
    """A dup of each fd the fd store carried kept under its key (not stored again).
    -> (dict[Key, tuple[int, int]], Exception | None): (st_dev, st_ino) of each newly
    kept, and the failure that stopped the rest, if one did."""

    entries: tuple[tuple[Key, FdEntry], ...]


class Restore(NamedTuple):
    """Rebuild the fds from the handover, or wait for those rebuilt ahead. -> None;
    raises the first failure (Corrupted)."""

    entries: tuple[tuple[Key, FdEntry], ...]


class Claim(NamedTuple):
    """Keep each rebuilt fd under its key. -> dict[Key, tuple[int, int] | None]: the
    (st_dev, st_ino) of each newly kept, None where an fd was already held, no entry
    where none was rebuilt."""

    keys: tuple[Key, ...]


class RestoreAhead(NamedTuple):
    """Rebuild these fds in this order, ahead of the calls that will want them. -> None"""

    entries: tuple[tuple[Key, FdEntry], ...]


class SettleRestores(NamedTuple):
    """Wait for rebuilds of fds let go (of one session, or all) to end. -> None"""

    session: str | None = None


# ---- the backend ------------------------------------------------------------------------


class RebootCounts(NamedTuple):
    """systemd's reboot counts, where the backend rests on them. -> RebootCounts | None"""


class BootFacts(NamedTuple):
    """This boot's id and PID 1's start time. -> tuple[str, int | None]"""


class PrepareHandover(NamedTuple):
    """The backend's brownout work on every held fd. -> None; raises its failure."""


class WriteHandover(NamedTuple):
    """The handover for the next kernel written. -> int bytes carried; raises Refused
    for an OSError, the backend's own error otherwise."""


class DiscardHandover(NamedTuple):
    """Every trace of a (partial) handover removed. -> None; raises Refused."""


class BackendFinishSession(NamedTuple):
    """The backend lets go of what `session` never retrieved. -> None"""

    session: str
    released: tuple[str, ...]


class BackendFinish(NamedTuple):
    """The backend lets go of everything the previous boot handed over. -> None"""


# ---- waits, and who hears of it ---------------------------------------------------------


class Deadline(NamedTuple):
    """The loop's time `seconds` from now. -> float"""

    seconds: float


class WaitChange(NamedTuple):
    """Until the core's state changes (a record is announced, a command ends) or the
    deadline passes. -> bool: True if it changed."""

    deadline: float | None = None


class Announce(NamedTuple):
    """Tell listeners (signals, properties, STATUS=) of durable records. -> None"""

    records: tuple[Record, ...]


class FreezeStarted(NamedTuple):
    """Tell the VMMs that asked to quiesce that Freeze is waiting for them. -> None"""


class RebootNotFollowed(NamedTuple):
    """Tell listeners that the reboot failed, and why. -> None"""

    reason: str


class Notify(NamedTuple):
    """sd_notify fields for systemd. -> None"""

    fields: tuple[str, ...]


class Log(NamedTuple):
    """One structured log line. -> None"""

    level: str
    event: str
    fields: Mapping[str, Any]


class LogRestored(NamedTuple):
    """Fds restored for a caller, logged with others restored within a moment. -> None"""

    session: str
    restored: Mapping[str, int]  # token -> bytes


class WriteRestoredLog(NamedTuple):
    """The restored fds logged so far written out now. -> None"""


# Every effect, one closed union; the outcome of each is in its docstring.
Effect = (
    Enqueue
    | Flush
    | StoreBarrier
    | Rewrite
    | Compact
    | Inspect
    | CloseFds
    | Hold
    | LetGo
    | CloseReleased
    | FollowUndo
    | Unheld
    | Dup
    | Release
    | ReleaseSpares
    | Sizes
    | TakeCarried
    | Restore
    | Claim
    | RestoreAhead
    | SettleRestores
    | RebootCounts
    | BootFacts
    | PrepareHandover
    | WriteHandover
    | DiscardHandover
    | BackendFinishSession
    | BackendFinish
    | Deadline
    | WaitChange
    | Announce
    | FreezeStarted
    | RebootNotFollowed
    | Notify
    | Log
    | LogRestored
    | WriteRestoredLog
)

ASYNC: frozenset[type] = frozenset({
    Flush, StoreBarrier, Rewrite, Compact, Restore, SettleRestores, RebootCounts,
    PrepareHandover, WriteHandover, DiscardHandover, BackendFinishSession, BackendFinish,
    WaitChange,
})
SHARED: frozenset[type] = frozenset({Flush, StoreBarrier, Rewrite})
