"""The orchestrator core: the live-update state machine and every rule about sessions.

Theory of operation. The host moves through four phases:

    NORMAL --Prepare--> PREPARED --Freeze--> FROZEN --Reboot--> (kexec) UPDATED --Finish--> NORMAL
       ^---------------- Cancel (from PREPARED or FROZEN) ------------------'

Each command method checks the caller and the phase, decides, applies its decision to the
in-memory state and returns the records that describe it; the caller must make those
records durable before it acknowledges the command. `apply` is the only mutator of the
durable state, so replaying a journal through it rebuilds exactly the state that produced
it. This module does no I/O: no files, no fds, no bus; it takes plain values and raises
contract errors.

In-flight states are states too. A host command whose effects take an await (Prepare's
backend work, Freeze waiting on its barrier, Reboot writing the handover, Cancel and
Finish cleaning up) holds `in_flight` from its decision until its caller calls `done`;
every other host command is refused meanwhile (Cancel may interrupt a waiting Freeze),
and a command that awaited asks again here before it decides (`freeze` after the
barrier, `check_retrieve_fd` after a restore). Reboot is journaled (RebootStarted) so
that a restart knows a handover was under way, and a handover is taken as a new boot only
on evidence: another boot id, or the old daemon's KexecSimulated.
"""

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TypeVar

from liveupdated.contract import FAILS_WITH, HISTORY_KEPT, method_name
from liveupdated.core.errors import (
    AccessDenied,
    Corrupted,
    DependencyMissing,
    Details,
    InvalidArgument,
    NoSuchSession,
    NoSuchToken,
    QuotaExceeded,
    SessionExists,
    TokenExists,
    WrongState,
)
from liveupdated.core.names import (
    MAX_FDS_PER_CALL,
    MAX_REASON_LENGTH,
    MAX_REQUIRES,
    check_name,
    check_reason,
    check_session_name_for,
)
from liveupdated.core.records import (
    CycleRecorded,
    DaemonStarted,
    FdCorrupted,
    FdLost,
    FdPreserved,
    FdQuarantined,
    FdReleased,
    FdRestored,
    FreezeDelaySet,
    HandoverWritten,
    KexecSimulated,
    PhaseChanged,
    QuarantineReleased,
    Rebooted,
    RebootFailed,
    RebootStarted,
    Record,
    RecoveryDecided,
    SessionCreated,
    SessionDropped,
    SessionFinished,
    SessionReady,
    UpdateCycle,
)


class Phase(StrEnum):
    NORMAL = "normal"
    PREPARED = "prepared"
    FROZEN = "frozen"
    UPDATED = "updated"


class UnderWay(StrEnum):
    """The host command whose effects are under way (from its decision to its `done`)."""

    NOTHING = ""
    PREPARE = "Prepare"  # the backend's brownout work
    FREEZE = "Freeze"  # waiting on the freeze barrier
    CANCEL = "Cancel"  # discarding the handover
    REBOOT = "Reboot"  # writing the handover, then awaiting the reboot
    FINISH = "Finish"  # the backend letting go, the journal compacted


# Which phase each host-wide command needs, and where it leads.
PHASE_TRANSITIONS: dict[str, tuple[frozenset[Phase], Phase]] = {
    "Prepare": (frozenset({Phase.NORMAL}), Phase.PREPARED),
    "Freeze": (frozenset({Phase.PREPARED}), Phase.FROZEN),
    "Cancel": (frozenset({Phase.PREPARED, Phase.FROZEN}), Phase.NORMAL),
    "Finish": (frozenset({Phase.UPDATED}), Phase.NORMAL),
}

# Which phases each session-level command is allowed in.
SESSION_COMMAND_PHASES: dict[str, frozenset[Phase]] = {
    "CreateSession": frozenset({Phase.NORMAL}),
    "RetrieveSession": frozenset({Phase.UPDATED}),
    "PreserveFd": frozenset({Phase.NORMAL}),
    "PreserveFds": frozenset({Phase.NORMAL}),
    "UnpreserveFd": frozenset({Phase.NORMAL}),
    "DelayFreeze": frozenset({Phase.NORMAL}),
    "ReadyForFreeze": frozenset({Phase.PREPARED}),
    "RetrieveFd": frozenset({Phase.NORMAL, Phase.UPDATED}),
    "Finish": frozenset({Phase.UPDATED}),
    "Close": frozenset({Phase.NORMAL}),
}


@dataclass(frozen=True)
class Caller:
    """Who is calling: the connection's uid, systemd unit and unique bus name."""

    uid: int
    unit: str
    client: str
    admin: bool


@dataclass(frozen=True)
class Limits:
    """Defaults never exceed what the Linux 6.19 LUO accepts (744 sessions, 128 fds each).

    Bytes are apparent sizes: on the kernel backend every page of a preserved memfd is
    pinned, so these bound the RAM one tenant can pin. The per-uid limits bind every
    caller but admins; an unset per-uid byte limit is a quarter of the host's, so no one
    tenant can take the host's whole budget from root."""

    max_sessions: int = 744
    max_fds_per_session: int = 128
    max_sessions_per_uid: int = 64
    max_preserved_bytes: int = 4 << 40
    max_fds_per_uid: int = 1024
    max_bytes_per_uid: int = 0  # 0: a quarter of max_preserved_bytes

    @property
    def bytes_per_uid(self) -> int:
        return self.max_bytes_per_uid or max(1, self.max_preserved_bytes // 4)


@dataclass(frozen=True)
class FdFacts:
    """What an fd handler learned about an fd when it was handed over."""

    kind: str
    size: int
    name: str
    seals: int
    dev: int = 0  # which file it is (st_dev, st_ino)
    ino: int = 0


@dataclass
class FdEntry:
    token: str
    kind: str
    requires: tuple[str, ...]
    size: int
    name: str
    seals: int
    problem: str = ""  # "lost" (no fd after a restart) or "corrupted" (bad journal record)
    restored: bool = False
    dev: int = 0  # the file held under it (0: not recorded)
    ino: int = 0


@dataclass(frozen=True)
class QuarantinedFd:
    """An fd the journal cannot explain: kept whole under an id of its own (`q<N>`, so
    that it never shares a key or a store name with a live fd), never handed to a VMM."""

    id: str
    session: str  # the name it was stored under, for the admin
    token: str
    size: int
    reason: str
    legacy: bool = False  # quarantined by an earlier version: stored as session/token

    @property
    def likely_uid(self) -> int | None:
        """The owner its name suggests: non-root session names start with `<uid>-`."""
        head, dash, _ = self.session.partition("-")
        return int(head) if dash and head.isdigit() else None


@dataclass
class Session:
    name: str
    uid: int
    unit: str
    client: str
    fds: dict[str, FdEntry] = field(default_factory=dict)
    bus: str = ""  # the id of the bus its client is on ("": not recorded)
    prepared: bool = False  # through Prepare: never dropped for a departed client
    delay_freeze: bool = False
    ready: bool = False
    finished: bool = False

    @property
    def preserved_bytes(self) -> int:
        return sum(entry.size for entry in self.fds.values())


_HOST_RECORDS = (
    PhaseChanged, Rebooted, RebootStarted, RebootFailed, KexecSimulated, FdQuarantined,
    QuarantineReleased, HandoverWritten, CycleRecorded, DaemonStarted, RecoveryDecided,
)


# What the held fds must follow when a decision is taken back: ("unpreserved", key) to
# let go, ("unreleased", key) to hold again.
Follow = tuple[str, tuple[str, str]]


V = TypeVar("V")


def _realtime_usec() -> int:
    return time.time_ns() // 1000


class Orchestrator:
    def __init__(
        self, limits: Limits | None = None, clock_usec: Callable[[], int] = _realtime_usec
    ) -> None:
        self.limits = limits or Limits()
        self.phase = Phase.NORMAL
        self.sessions: dict[str, Session] = {}
        self.last_blackout_usec = 0
        self.freeze_started_usec = 0
        self.handover_boot_id = ""
        self.reboot: RebootStarted | None = None  # journaled: a handover is being written
        self.kexec_simulated = False  # the old daemon left its evidence of a new boot
        self.in_flight = UnderWay.NOTHING
        self.freeze_attempt = 0  # which Freeze holds in_flight FREEZE
        self.session_finishes = 0  # Session.Finish calls between decision and backend
        self.finish_decided = 0  # the serial of the latest Manager.Finish
        self.restoring_ahead = False  # fds of the previous boot rebuilt ahead (once)
        # Not durable: why the journal cannot be written (degraded while set), and why it
        # could not be read at start (then degraded until a restart reads it).
        self.storage_problem = ""
        self.journal_unreadable = ""
        self.rewriting = 0  # calls waiting on a rewrite of the journal (to end degraded)
        self.quarantine: dict[str, QuarantinedFd] = {}  # by id
        self._quarantine_ids = 0  # the highest N of the ids q<N> given so far
        self.bus_id = ""  # the bus the daemon is on now (not durable: set at connect)
        # Every decision's records get a serial; those not yet durable keep an undo.
        self.serial = 0
        self.durable_serial = 0  # decisions up to here are in the journal
        # (serial, the serial its decision ends at, undo), oldest first.
        self._undo: deque[tuple[int, int, Callable[[], Follow | None]]] = deque()
        self._taken_back: set[int] = set()  # decisions rolled back, by their last serial
        # Clients that left while decisions were still to undo: (unique name, bus id).
        self._departed: set[tuple[str, str]] = set()
        self._revertible = True
        self._host_epoch = 0  # unconditional host decisions so far
        # Files whose release is durable in the journal since its last compaction:
        # (session, token, dev, ino). Compaction follows the store's cleanup.
        self.released_files: set[tuple[str, str, int, int]] = set()
        self.history: list[UpdateCycle] = []  # ended cycles, oldest first
        self.cycle: UpdateCycle | None = None  # the update under way
        self.started: DaemonStarted | None = None  # the latest start: release and boot
        self._fd_total = 0  # kept up to date by apply: PreserveFd must not scan every fd
        self._bytes_total = 0
        self._uid_fds: dict[int, int] = {}
        self._uid_bytes: dict[int, int] = {}
        self._clock_usec = clock_usec

    # ---- the one mutator -------------------------------------------------------------

    def apply(self, record: Record) -> None:
        if self.cycle is not None or isinstance(record, PhaseChanged | CycleRecorded):
            self._track_cycle(record)  # before: it needs the state the record changes
        if isinstance(record, _HOST_RECORDS):
            self._apply_host(record)
            return
        match record:
            case SessionCreated():
                self.sessions[record.session] = Session(
                    record.session, record.uid, record.unit, record.client,
                    bus=record.bus, prepared=record.prepared,
                )
            case FdPreserved():
                self.sessions[record.session].fds[record.token] = FdEntry(
                    record.token,
                    record.kind,
                    record.requires,
                    record.size,
                    record.name,
                    record.seals,
                    dev=record.dev,
                    ino=record.ino,
                )
                self._count(record.session, record.size)
            case FdReleased():
                entry = self.sessions[record.session].fds.pop(record.token)
                self._count(record.session, -entry.size, -1)
                if entry.ino:  # recovery closes this very file if the store still has it
                    self.released_files.add((record.session, record.token, entry.dev,
                                             entry.ino))
            case FdLost():
                self.sessions[record.session].fds[record.token].problem = "lost"
            case FdCorrupted():
                self.sessions[record.session].fds[record.token] = FdEntry(
                    record.token, "memfd", (), record.size, "", 0, problem="corrupted"
                )
                self._count(record.session, record.size)
            case FdRestored():
                entry = self.sessions[record.session].fds[record.token]
                entry.restored = True
                if record.ino:
                    entry.dev, entry.ino = record.dev, record.ino
            case SessionDropped():
                dropped = self.sessions.pop(record.session)
                for entry in dropped.fds.values():  # normally released before the drop
                    self._count_uid(dropped.uid, -entry.size, -1)
                    self._bytes_total -= entry.size
                    self._fd_total -= 1
            case FreezeDelaySet():
                self.sessions[record.session].delay_freeze = record.enabled
            case SessionReady():
                self.sessions[record.session].ready = True
            case SessionFinished():
                self.sessions[record.session].finished = True

    def _apply_host(self, record: Record) -> None:
        match record:
            case PhaseChanged():
                self.phase = Phase(record.new)
                if self.phase is Phase.FROZEN:
                    self.freeze_started_usec = record.at_usec
                elif self.phase is Phase.NORMAL:
                    self.freeze_started_usec = 0  # a cancelled freeze starts no blackout
                    self.reboot = None
                if self.phase in (Phase.NORMAL, Phase.PREPARED):
                    for session in self.sessions.values():
                        session.ready = False
                if self.phase is Phase.PREPARED:
                    for session in self.sessions.values():
                        session.prepared = True
            case Rebooted():
                self.phase = Phase.UPDATED
                self.last_blackout_usec = record.blackout_usec
                self.handover_boot_id = record.boot_id
                self.reboot = None
                self.kexec_simulated = False
                for session in self.sessions.values():
                    session.ready = False
            case RebootStarted():
                self.reboot = record
                self.kexec_simulated = False
            case RebootFailed():
                self.reboot = None
                self.kexec_simulated = False
            case KexecSimulated():
                self.kexec_simulated = True
            case FdQuarantined():
                qid = record.id or f"q{self._quarantine_ids + 1}"
                self._quarantine_ids = max(self._quarantine_ids, _quarantine_number(qid))
                self.quarantine[qid] = QuarantinedFd(
                    qid, record.session, record.token, record.size, record.reason,
                    legacy=not record.id,
                )
            case QuarantineReleased():
                qid = record.id or next(
                    q.id for q in self.quarantine.values()
                    if q.legacy and (q.session, q.token) == (record.session, record.token)
                )
                del self.quarantine[qid]
            case RecoveryDecided():
                pass  # the history's (_track_cycle)
            case DaemonStarted():
                self.started = record


    def _track_cycle(self, record: Record) -> None:
        """The update history: what each record tells of the cycle under way."""
        cycle = self.cycle
        match record:
            case PhaseChanged(old="normal", new="prepared"):
                self.cycle = UpdateCycle(started_usec=record.at_usec, prepared_by=record.by_uid)
            case PhaseChanged(new="frozen") if cycle is not None:
                self.cycle = replace(cycle, frozen_usec=record.at_usec, frozen_by=record.by_uid)
            case PhaseChanged(new="normal") if cycle is not None:
                if record.old == "updated":
                    failed = cycle.fds_lost or cycle.fds_corrupted
                    outcome = "failed" if failed else "finished"
                else:
                    outcome = "cancelled"
                self._end_cycle(replace(cycle, ended_usec=record.at_usec,
                                        ended_by=record.by_uid, outcome=outcome))
            case RebootStarted() if cycle is not None:
                self.cycle = replace(cycle, reboot_usec=record.at_usec, reboot_by=record.by_uid,
                                     fds_carried=self._fd_total,
                                     bytes_carried=self._bytes_total)
            case RebootFailed() if cycle is not None:
                self.cycle = replace(cycle, reboot_usec=0, reboots_failed=cycle.reboots_failed + 1,
                                     notes=(*cycle.notes, f"reboot failed: {record.reason}"))
            case RecoveryDecided() if cycle is not None:
                self.cycle = replace(cycle, notes=(*cycle.notes,
                                                   f"{record.decision} ({record.evidence})"))
            case HandoverWritten() if cycle is not None:
                self.cycle = replace(cycle, handover_written_usec=record.at_usec,
                                     fds_carried=record.fds, bytes_carried=record.bytes)
            case Rebooted() if cycle is not None:
                self.cycle = replace(cycle, rebooted_usec=record.at_usec)
            case FdRestored() if cycle is not None and self.phase is Phase.UPDATED:
                self.cycle = replace(cycle, first_fd_usec=cycle.first_fd_usec or record.at_usec,
                                     last_fd_usec=record.at_usec,
                                     fds_retrieved=cycle.fds_retrieved + 1)
            case FdLost() if cycle is not None:
                self.cycle = replace(cycle, fds_lost=cycle.fds_lost + 1)
            case FdCorrupted() if cycle is not None:
                self.cycle = replace(cycle, fds_corrupted=cycle.fds_corrupted + 1)
            case CycleRecorded():
                if record.cycle.outcome == "in progress":
                    self.cycle = record.cycle
                else:
                    self._end_cycle(record.cycle)

    def _end_cycle(self, cycle: UpdateCycle) -> None:
        self.history = [*self.history, cycle][-HISTORY_KEPT:]
        self.cycle = None

    def handover_written(self, fds: int, size: int) -> list[Record]:
        return self._commit([HandoverWritten(at_usec=self._clock_usec(), fds=fds, bytes=size)])

    # ---- undo: a decision the journal refused changes nothing -------------------------

    @contextlib.contextmanager
    def unconditional(self) -> Iterator[None]:
        """Decisions that stand even if the journal refuses them (Cancel while degraded,
        a departed client's drop, a restore, a failed reboot): not undone."""
        before, self._revertible = self._revertible, False
        try:
            yield
        finally:
            self._revertible = before

    def durable_through(self, serial: int) -> None:
        """Every decision up to `serial` is in the journal: no longer to undo."""
        self.durable_serial = max(self.durable_serial, serial)
        while self._undo and self._undo[0][0] <= serial:
            self._undo.popleft()
        if not self._undo:
            self._departed.clear()  # nothing left to take back: their drops stand

    def roll_back(self) -> list[Follow]:
        """Undo, newest first, every revertible decision not yet durable (the journal
        refused them: they and every decision taken on them). Returns what the held fds
        must follow: ("unpreserved", key) to let go, ("unreleased", key) to hold again."""
        follow: list[Follow] = []
        while self._undo and self._undo[-1][0] > self.durable_serial:
            _, decision, undo = self._undo.pop()
            self._taken_back.add(decision)
            done = undo()
            if done is not None:
                follow.append(done)
        return follow

    def taken_back(self, decision: int) -> bool:
        """Was the decision that ended at serial `decision` rolled back (the journal
        refused it, or one it was pipelined on)? Asked once, by its plan, after its
        flush: a flush that succeeds after the journal was rewritten does not make a
        decision taken back before the rewrite durable."""
        if decision in self._taken_back:
            self._taken_back.discard(decision)
            return True
        return False

    def _undo_of(self, record: Record) -> Callable[[], Follow | None]:
        """How to take `record` back, read from the state before it is applied."""
        host = (self.phase, self.freeze_started_usec, self.reboot, self.kexec_simulated,
                self.last_blackout_usec, self.handover_boot_id, self.cycle, self.history,
                self.started)
        epoch = self._host_epoch
        flags = ({n: (s.ready, s.prepared) for n, s in self.sessions.items()}
                 if isinstance(record, PhaseChanged) else {})

        def restore_host() -> None:
            if self._host_epoch != epoch:
                return  # an unconditional host decision (a Cancel) came since: it stands
            restores_since = self.cycle
            (self.phase, self.freeze_started_usec, self.reboot, self.kexec_simulated,
             self.last_blackout_usec, self.handover_boot_id, self.cycle, self.history,
             self.started) = host
            if self.cycle is not None and restores_since is not None:
                # Restores are unconditional and stand: the cycle keeps counting them.
                self.cycle = replace(self.cycle, fds_retrieved=restores_since.fds_retrieved,
                                     first_fd_usec=restores_since.first_fd_usec,
                                     last_fd_usec=restores_since.last_fd_usec)
            for name, (ready, prepared) in flags.items():
                if name in self.sessions:
                    self.sessions[name].ready, self.sessions[name].prepared = ready, prepared

        take_back = self._take_back(record)

        def undo() -> Follow | None:
            restore_host()
            return take_back()

        return undo

    def _take_back(self, record: Record) -> Callable[[], Follow | None]:
        """The part of `record` outside the host's state, to take back (read now, from the
        state before it is applied); what the held fds must follow, if anything."""
        match record:
            case SessionCreated():
                def created() -> None:
                    self.sessions.pop(record.session, None)
                return created
            case FdPreserved():
                def preserved() -> Follow | None:
                    if record.session not in self.sessions:
                        return None  # dropped since, unconditionally: its fds went with it
                    entry = self.sessions[record.session].fds.pop(record.token)
                    self._count(record.session, -entry.size, -1)
                    return ("unpreserved", (record.session, record.token))
                return preserved
            case FdReleased():
                fds = self.sessions[record.session].fds
                entry, position = fds[record.token], list(fds).index(record.token)
                file = (record.session, record.token, entry.dev, entry.ino)

                def released() -> Follow | None:
                    self.released_files.discard(file)
                    if record.session not in self.sessions:
                        return None  # dropped since, unconditionally: the fd goes all the same
                    _put_back(self.sessions[record.session].fds, record.token, entry, position)
                    self._count(record.session, entry.size)
                    return ("unreleased", (record.session, record.token))
                return released
            case SessionDropped():
                session = self.sessions[record.session]
                at = list(self.sessions).index(record.session)

                def dropped() -> None:
                    _put_back(self.sessions, record.session, session, at)
                    for held in session.fds.values():
                        self._count(record.session, held.size)
                return dropped
            case FreezeDelaySet() | SessionReady() | SessionFinished():
                flagged = self.sessions[record.session]
                before = (flagged.delay_freeze, flagged.ready, flagged.finished)

                def flag() -> None:
                    flagged.delay_freeze, flagged.ready, flagged.finished = before
                return flag
            case QuarantineReleased():
                quarantine = dict(self.quarantine)

                def unreleased() -> None:
                    self.quarantine = quarantine
                return unreleased
            case _:
                return lambda: None  # a host record: restoring the host's state is all

    def snapshot(self) -> list[Record]:
        """Records that rebuild the current state from nothing: what compaction keeps."""
        records: list[Record] = []
        if self.phase is Phase.UPDATED:
            records.append(
                Rebooted(boot_id=self.handover_boot_id, blackout_usec=self.last_blackout_usec)
            )
        elif self.phase is not Phase.NORMAL:
            records.append(
                PhaseChanged(old="normal", new=self.phase.value, at_usec=self.freeze_started_usec)
            )
        if self.reboot is not None:
            records.append(self.reboot)
        if self.kexec_simulated:
            records.append(KexecSimulated(boot_id=self.reboot.boot_id if self.reboot else ""))
        records += [
            FdQuarantined(session=q.session, token=q.token, size=q.size, reason=q.reason,
                          id=q.id)
            for q in self.quarantine.values()
        ]
        if self.started is not None:
            records.append(self.started)
        records += [CycleRecorded(cycle=c) for c in self.history]
        for s in self.sessions.values():
            records.append(
                SessionCreated(session=s.name, uid=s.uid, unit=s.unit, client=s.client,
                               bus=s.bus, prepared=s.prepared)
            )
            for e in s.fds.values():
                if e.problem == "corrupted":
                    records.append(FdCorrupted(session=s.name, token=e.token, size=e.size))
                    continue
                records.append(
                    FdPreserved(session=s.name, token=e.token, kind=e.kind,
                                requires=e.requires, size=e.size, name=e.name, seals=e.seals,
                                dev=0 if e.restored else e.dev, ino=0 if e.restored else e.ino)
                )
                if e.problem == "lost":
                    records.append(FdLost(session=s.name, token=e.token))
                if e.restored:
                    records.append(FdRestored(session=s.name, token=e.token,
                                              dev=e.dev, ino=e.ino))
            if s.delay_freeze:
                records.append(FreezeDelaySet(session=s.name, enabled=True))
            if s.ready:
                records.append(SessionReady(session=s.name))
            if s.finished:
                records.append(SessionFinished(session=s.name))
        if self.cycle is not None:  # last: it replaces what the records above counted
            records.append(CycleRecorded(cycle=self.cycle))
        return records

    def _commit(self, records: list[Record]) -> list[Record]:
        """Apply a decision's records; each gets the next serial and, unless the decision
        is unconditional, an undo for the case the journal refuses it."""
        decision = self.serial + len(records)
        for record in records:
            undo = self._undo_of(record) if self._revertible else None
            if not self._revertible and isinstance(record, _HOST_RECORDS):
                self._host_epoch += 1
            self.apply(record)
            self.serial += 1
            if undo is not None:
                self._undo.append((self.serial, decision, undo))
        return records

    # ---- lookups and rules -----------------------------------------------------------

    def session(self, name: str) -> Session:
        try:
            return self.sessions[name]
        except KeyError:
            raise NoSuchSession(f"no session named {name!r}", {"session": name}) from None

    def may_use(self, caller: Caller, name: str) -> bool:
        """Is there a session `name` the caller owns, or may use as an admin? The one
        ownership rule: calls, properties, introspection and signals all ask it."""
        session = self.sessions.get(name)
        return session is not None and (caller.admin or caller.uid == session.uid)

    def owned_session(self, caller: Caller, name: str) -> Session:
        """The session, if the caller is its owner or root; AccessDenied otherwise."""
        session = self.session(name)
        if not self.may_use(caller, name):
            raise AccessDenied(
                f"session {name!r} belongs to uid {session.uid}; only it or root may use it",
                {"session": name},
            )
        return session

    def visible_sessions(self, caller: Caller) -> list[Session]:
        return [s for s in self.sessions.values() if self.may_use(caller, s.name)]

    def session_state(self, session: Session) -> str:
        if self.phase is Phase.UPDATED:
            return "finished" if session.finished else "incoming"
        if self.phase is Phase.PREPARED and session.ready:
            return "ready"
        return {Phase.NORMAL: "open", Phase.PREPARED: "prepared", Phase.FROZEN: "frozen"}[
            self.phase
        ]

    def fd_entry(self, session: Session, token: str) -> FdEntry:
        try:
            return session.fds[token]
        except KeyError:
            raise NoSuchToken(f"session {session.name!r} has no token {token!r}",
                              {"session": session.name, "token": token}) from None

    def _count(self, session: str, size: int, fds: int = 1) -> None:
        self._bytes_total += size
        self._fd_total += fds
        self._count_uid(self.sessions[session].uid, size, fds)

    def _count_uid(self, uid: int, size: int, fds: int) -> None:
        self._uid_bytes[uid] = self._uid_bytes.get(uid, 0) + size
        self._uid_fds[uid] = self._uid_fds.get(uid, 0) + fds

    def uid_usage(self, uid: int) -> tuple[int, int]:
        """(fds, bytes) the sessions of `uid` hold."""
        return self._uid_fds.get(uid, 0), self._uid_bytes.get(uid, 0)

    def total_preserved_bytes(self) -> int:
        return self._bytes_total

    def fd_count(self) -> int:
        return self._fd_total

    def _require_phase(self, command: str, allowed: Iterable[Phase]) -> None:
        allowed = frozenset(allowed)
        if self.phase not in allowed:
            phases = sorted(p.value for p in allowed)
            raise WrongState(
                f"{command} is allowed in state {' or '.join(phases)}, not {self.phase.value}",
                {"command": method_name(command), "state": self.phase.value, "allowed": phases},
            )

    def _require_admin(self, caller: Caller, command: str) -> None:
        if not caller.admin:
            action = "drop-session" if command == "DropSession" else "manage"
            method = method_name(command)
            raise AccessDenied(
                f"{command} is for the host's administrator: root, or a user that polkit "
                f"allows org.liveupdate1.{action}",
                {"command": method} if method in FAILS_WITH else {},
            )

    def _transition(self, caller: Caller, command: str) -> list[Record]:
        self._require_admin(caller, command)
        allowed, new = PHASE_TRANSITIONS[command]
        self._require_phase(command, allowed)
        self._require_idle(command)
        return [PhaseChanged(old=self.phase.value, new=new.value, at_usec=self._clock_usec(),
                             by_uid=caller.uid)]

    def _require_idle(self, command: str) -> None:
        """No host command is under way, but for the ones `command` may interrupt: a
        Freeze waiting on its barrier can be cancelled, or unblocked by DropSession."""
        if self.reboot is not None:
            raise WrongState(
                f"{command} is not possible: a Reboot is under way (the handover is being "
                "written, or the reboot is awaited); a Reboot that fails, or whose reboot "
                "does not follow, returns to frozen and says RebootFailed",
                {"command": method_name(command), "state": self.phase.value,
                 "under_way": "Reboot"},
            )
        interruptible = (command in ("Cancel", "DropSession")
                         and self.in_flight is UnderWay.FREEZE)
        if self.in_flight and not interruptible:
            raise WrongState(
                f"{command} is not possible while {self.in_flight} is under way",
                {"command": method_name(command), "state": self.phase.value,
                 "under_way": self.in_flight.value},
            )

    def done(self, command: str, attempt: int = 0) -> None:
        """The effects of host command `command` are over (succeeded or not); a Freeze
        says which attempt, so that an interrupted one cannot end the next one's wait."""
        if self.in_flight == command and (
            command != UnderWay.FREEZE or attempt == self.freeze_attempt
        ):
            self.in_flight = UnderWay.NOTHING

    # ---- session commands ------------------------------------------------------------

    def create_session(self, caller: Caller, name: str) -> list[Record]:
        """A quarantined fd stored under this name does not block it: quarantined fds
        have ids of their own."""
        check_session_name_for(caller.uid, caller.admin, name)
        self._require_phase("CreateSession", SESSION_COMMAND_PHASES["CreateSession"])
        if name in self.sessions:
            raise SessionExists(f"a session named {name!r} already exists; pick another name",
                                {"session": name})
        if len(self.sessions) >= self.limits.max_sessions:
            raise QuotaExceeded(
                f"the host holds the maximum of {self.limits.max_sessions} sessions",
                {"limit": "max-sessions", "maximum": self.limits.max_sessions},
            )
        owned = sum(1 for s in self.sessions.values() if s.uid == caller.uid)
        if caller.uid != 0 and owned >= self.limits.max_sessions_per_uid:
            raise QuotaExceeded(
                f"uid {caller.uid} already has the maximum of "
                f"{self.limits.max_sessions_per_uid} sessions",
                {"limit": "max-sessions-per-uid", "maximum": self.limits.max_sessions_per_uid,
                 "uid": caller.uid},
            )
        return self._commit(
            [SessionCreated(session=name, uid=caller.uid, unit=caller.unit, client=caller.client,
                            bus=self.bus_id)]
        )

    def retrieve_session(self, caller: Caller, name: str) -> Session:
        check_name(name, "session name")
        self._require_phase("RetrieveSession", SESSION_COMMAND_PHASES["RetrieveSession"])
        return self.owned_session(caller, name)

    def check_preserve_all(
        self,
        caller: Caller,
        name: str,
        wanted: Sequence[tuple[str, Sequence[str]]],
        command: str,
    ) -> Session:
        """Every check of PreserveFd or PreserveFds that does not need the fds: (token,
        requires) pairs that are preserved all together or not at all."""
        if len(wanted) > MAX_FDS_PER_CALL:
            raise InvalidArgument(
                f"{command} takes at most {MAX_FDS_PER_CALL} fds a call, not {len(wanted)}"
            )
        new: dict[str, Sequence[str]] = {}
        for token, requires in wanted:
            check_name(token, "token")
            if len(requires) > MAX_REQUIRES:
                raise InvalidArgument(
                    f"requires of {token!r} names {len(requires)} tokens; at most "
                    f"{MAX_REQUIRES} are allowed (tokens of the same session)"
                )
            for required in requires:
                check_name(required, "required token")
            if len(set(requires)) != len(requires):
                raise InvalidArgument(
                    f"requires of {token!r} lists a token twice: {list(requires)}"
                )
            if token in new:
                raise InvalidArgument(f"{command} names token {token!r} twice; one fd per token")
            new[token] = requires
        session = self.owned_session(caller, name)
        self._require_phase(command, SESSION_COMMAND_PHASES[command])
        for token in new:
            if token in session.fds:
                raise TokenExists(
                    f"session {name!r} already holds token {token!r}; UnpreserveFd it first",
                    {"session": name, "token": token},
                )
        if len(session.fds) + len(new) > self.limits.max_fds_per_session:
            most = self.limits.max_fds_per_session
            raise QuotaExceeded(
                f"session {name!r} holds the maximum of {most} fds" if len(new) == 1 else
                f"session {name!r} holds {len(session.fds)} fds; {len(new)} more would pass "
                f"the maximum of {most} fds",
                {"limit": "max-fds-per-session", "maximum": most, "session": name},
            )
        held_fds, _ = self.uid_usage(session.uid)
        if session.uid != 0 and held_fds + len(new) > self.limits.max_fds_per_uid:
            raise QuotaExceeded(
                f"uid {session.uid} holds {held_fds} fds; {len(new)} more would pass its "
                f"limit of {self.limits.max_fds_per_uid} fds",
                {"limit": "max-fds-per-uid", "maximum": self.limits.max_fds_per_uid,
                 "uid": session.uid},
            )
        for token, requires in wanted:
            cycle = self._cycle_through(session, token, requires, new)
            if cycle:
                raise InvalidArgument(
                    f"requires of {token!r} would close a dependency cycle: {' -> '.join(cycle)}"
                )
        return session

    def _cycle_through(
        self,
        session: Session,
        token: str,
        requires: Sequence[str],
        new: Mapping[str, Sequence[str]],
    ) -> list[str] | None:
        """A path token -> ... -> token through the requires declared in the session and
        by the `new` tokens being added with it, if any."""
        stack: list[tuple[str, list[str]]] = [(r, [token, r]) for r in requires]
        seen: set[str] = set()
        while stack:
            current, path = stack.pop()
            if current == token:
                return path
            if current in seen:
                continue
            seen.add(current)
            if current in new:
                onward: Sequence[str] = new[current]
            elif current in session.fds:
                onward = session.fds[current].requires
            else:
                continue
            stack.extend((nxt, [*path, nxt]) for nxt in onward)
        return None

    def preserve_fd(
        self, caller: Caller, name: str, token: str, requires: Sequence[str], facts: FdFacts
    ) -> list[Record]:
        return self.preserve_fds(caller, name, [(token, requires, facts)], "PreserveFd")

    def preserve_fds(
        self,
        caller: Caller,
        name: str,
        fds: Sequence[tuple[str, Sequence[str], FdFacts]],
        command: str,
    ) -> list[Record]:
        """(token, requires, facts) of each fd: all preserved, or none."""
        session = self.check_preserve_all(caller, name, [(t, r) for t, r, _ in fds], command)
        self._check_bytes(caller, session.uid, sum(facts.size for _, _, facts in fds))
        return self._commit(
            [
                FdPreserved(
                    session=name,
                    token=token,
                    kind=facts.kind,
                    requires=tuple(requires),
                    size=facts.size,
                    name=facts.name,
                    seals=facts.seals,
                    dev=facts.dev,
                    ino=facts.ino,
                )
                for token, requires, facts in fds
            ]
        )

    def _check_bytes(self, caller: Caller, owner: int, size: int) -> None:
        """The budget of the session's owner (every uid's but root's, whoever calls),
        then the host's; a tenant is told of its own usage and limit only, never of the
        host's or of others'."""
        _, held = self.uid_usage(owner)
        limit = self.limits.bytes_per_uid
        if owner != 0 and held + size > limit:
            raise QuotaExceeded(
                f"uid {owner} holds {held} bytes; {size} more would pass its limit of "
                f"{limit} bytes (sizes are apparent sizes: holes count)",
                {"limit": "max-bytes-per-uid", "maximum": limit, "uid": owner},
            )
        total = self.total_preserved_bytes() + size
        if total > self.limits.max_preserved_bytes:
            if not caller.admin:
                raise QuotaExceeded(  # the host's limit, not its value nor its usage
                    f"the host has no room for {size} more preserved bytes now; "
                    "ask the host's administrator",
                    {"limit": "max-preserved-bytes"},
                )
            raise QuotaExceeded(
                f"preserving {size} bytes would bring the host to {total} bytes, over "
                f"the limit of {self.limits.max_preserved_bytes} bytes",
                {"limit": "max-preserved-bytes", "maximum": self.limits.max_preserved_bytes},
            )

    def unpreserve_fd(self, caller: Caller, name: str, token: str) -> list[Record]:
        check_name(token, "token")
        session = self.owned_session(caller, name)
        self._require_phase("UnpreserveFd", SESSION_COMMAND_PHASES["UnpreserveFd"])
        self.fd_entry(session, token)
        dependents = sorted(t for t, e in session.fds.items() if token in e.requires)
        if dependents:
            raise DependencyMissing(
                f"token {token!r} is required by {', '.join(dependents)} in session "
                f"{name!r}; unpreserve those first",
                {"session": name, "token": token, "required_by": dependents},
            )
        return self._commit([FdReleased(session=name, token=token, reason="unpreserved")])

    def check_retrieve_fds(
        self, caller: Caller, name: str, tokens: Sequence[str], command: str
    ) -> list[FdEntry]:
        """Every check of RetrieveFd or RetrieveFds: the entries of `tokens`, in order,
        all of them or an error naming the one at fault."""
        if len(tokens) > MAX_FDS_PER_CALL:
            raise InvalidArgument(
                f"{command} takes at most {MAX_FDS_PER_CALL} tokens a call, not {len(tokens)}"
            )
        if len(set(tokens)) != len(tokens):
            twice = next(t for t in tokens if tokens.count(t) > 1)
            raise InvalidArgument(f"{command} names token {twice!r} twice")
        return [self.check_retrieve_fd(caller, name, token) for token in tokens]

    def check_retrieve_fd(self, caller: Caller, name: str, token: str) -> FdEntry:
        check_name(token, "token")
        session = self.owned_session(caller, name)
        self._require_phase("RetrieveFd", SESSION_COMMAND_PHASES["RetrieveFd"])
        if session.finished:
            raise WrongState(f"session {name!r} is finished; its fds were released",
                             {"command": "Session.RetrieveFd", "state": self.phase.value,
                              "session": name})
        entry = self.fd_entry(session, token)
        if entry.problem == "lost":
            raise NoSuchToken(
                f"the fd of {name}/{token} was lost in a daemon restart without an fd store",
                {"session": name, "token": token},
            )
        if entry.problem == "corrupted":
            remedy = (
                "UnpreserveFd it and preserve it again" if self.phase is Phase.NORMAL
                else "Session.Finish releases it"
            )
            raise Corrupted(
                f"the journal record of {name}/{token} failed its checksum; the fd is held "
                f"but never handed out: {remedy}",
                {"session": name, "token": token, "state": self.phase.value},
            )
        return entry

    def check_restorable(self, key: tuple[str, str]) -> None:
        """A journaled fd the daemon does not hold is restored from the previous boot's
        handover; before a reboot, nothing can explain it."""
        if self.phase is not Phase.UPDATED:
            raise Corrupted(f"{key[0]}/{key[1]} is journaled but its fd is not held",
                            {"session": key[0], "token": key[1], "state": self.phase.value})

    def fd_restored(self, name: str, token: str, dev: int = 0, ino: int = 0) -> list[Record]:
        return self._commit([FdRestored(session=name, token=token, at_usec=self._clock_usec(),
                                        dev=dev, ino=ino)])

    def delay_freeze(self, caller: Caller, name: str, enable: bool) -> list[Record]:
        session = self.owned_session(caller, name)
        self._require_phase("DelayFreeze", SESSION_COMMAND_PHASES["DelayFreeze"])
        if session.delay_freeze == enable:
            return []
        return self._commit([FreezeDelaySet(session=name, enabled=enable)])

    def ready_for_freeze(self, caller: Caller, name: str) -> list[Record]:
        session = self.owned_session(caller, name)
        self._require_phase("ReadyForFreeze", SESSION_COMMAND_PHASES["ReadyForFreeze"])
        if session.ready:
            return []
        return self._commit([SessionReady(session=name)])

    def finish_session(self, caller: Caller, name: str) -> list[Record]:
        session = self.owned_session(caller, name)
        self._require_phase("Session.Finish", SESSION_COMMAND_PHASES["Finish"])
        if session.finished:
            return []
        released: list[Record] = [
            FdReleased(session=name, token=t, reason="finished")
            for t, e in session.fds.items()
            if not e.restored
        ]
        return self._commit([*released, SessionFinished(session=name)])

    def close_session(self, caller: Caller, name: str) -> list[Record]:
        self.owned_session(caller, name)
        self._require_phase("Close", SESSION_COMMAND_PHASES["Close"])
        return self._commit(self._drop(name, "closed"))

    def _drop(self, name: str, reason: str) -> list[Record]:
        session = self.sessions[name]
        released: list[Record] = [
            FdReleased(session=name, token=t, reason=reason) for t in session.fds
        ]
        return [*released, SessionDropped(session=name, reason=reason)]

    def drop_session(self, caller: Caller, name: str, reason: str) -> list[Record]:
        """An admin drops a session (one that blocks Freeze, say) with all its fds."""
        self._require_admin(caller, "DropSession")
        check_name(name, "session name")
        check_reason(reason)
        self.session(name)
        self._require_phase("DropSession", {Phase.NORMAL, Phase.PREPARED})
        self._require_idle("DropSession")
        why = f"dropped by uid {caller.uid}: {reason}" if reason else f"dropped by uid {caller.uid}"
        return self._commit(self._drop(name, why))

    def next_quarantine_id(self, offset: int = 0) -> str:
        """The id the next quarantined fd gets (`offset` more for a batch)."""
        return f"q{self._quarantine_ids + 1 + offset}"

    def quarantine_fds(self, found: Iterable[tuple[str, str, int, str]]) -> list[Record]:
        """(session, token, size, reason) of fds the journal cannot explain, in order:
        each held under the next id q<N>, reported, released only by an admin; recovery
        never closes them."""
        records = [
            FdQuarantined(session=s, token=t, size=size, reason=reason,
                          id=self.next_quarantine_id(i))
            for i, (s, t, size, reason) in enumerate(found)
        ]
        return self._commit(list(records))

    def visible_quarantine(self, caller: Caller) -> list[QuarantinedFd]:
        """Admins see every quarantined fd; a uid those its session names suggest."""
        return sorted(
            (q for q in self.quarantine.values() if caller.admin or q.likely_uid == caller.uid),
            key=lambda q: _quarantine_number(q.id),
        )

    def quarantined(self, caller: Caller, qid: str) -> QuarantinedFd:
        self._require_admin(caller, "a quarantined fd")
        if not isinstance(qid, str) or not qid.startswith("q") or not qid[1:].isdigit():
            raise InvalidArgument(
                f"{qid!r} is no quarantine id: ids are q<N>, as ListQuarantined gives them"
            )
        try:
            return self.quarantine[qid]
        except KeyError:
            raise NoSuchToken(f"no quarantined fd {qid}", {"id": qid}) from None

    def release_quarantined(self, caller: Caller, qid: str) -> list[Record]:
        found = self.quarantined(caller, qid)
        return self._commit(
            [QuarantineReleased(session=found.session, token=found.token, by_uid=caller.uid,
                                id=qid)]
        )

    def client_gone(self, client: str, bus_id: str | None = None) -> list[Record]:
        """The connection `client` on bus `bus_id` (this daemon's bus by default) left:
        its sessions that never went through Prepare go with it. A session created on
        another bus (before a reboot of the bus) is never matched by a unique name of
        this one: unique names are reused by a new bus."""
        bus = self.bus_id if bus_id is None else bus_id
        if self._undo and any(s.client == client and s.bus == bus
                              for s in self.sessions.values()):
            # A Prepare taken back would bring its sessions back: remembered till then.
            self._departed.add((client, bus))
        if self.phase is not Phase.NORMAL:
            return []
        records: list[Record] = []
        for name, session in list(self.sessions.items()):
            if session.client != client or session.prepared:
                continue
            if session.bus != bus:  # a unique name of another bus: not this client
                continue
            records += self._drop(name, "its client left the bus before Prepare")
        return self._commit(records)

    def departed_meanwhile(self) -> list[Record]:
        """After a roll back: the sessions of clients that left while a decision that is
        now taken back (a Prepare) kept them, dropped as their departure would have."""
        departed, self._departed = self._departed, set()
        records: list[Record] = []
        for client, bus in sorted(departed):
            records += self.client_gone(client, bus)
        return records

    def departed_elsewhere(self) -> list[Record]:
        """At start, once the bus is known: sessions whose client was on another bus
        (the bus restarted, or the host rebooted) and that never went through Prepare."""
        if self.phase is not Phase.NORMAL or not self.bus_id:
            return []
        records: list[Record] = []
        for name, session in list(self.sessions.items()):
            if session.bus and session.bus != self.bus_id and not session.prepared:
                records += self._drop(name, "its client's bus is gone (it was never prepared)")
        return self._commit(records)

    def clients(self) -> set[str]:
        """Unique names of the clients on this bus whose sessions a departure would drop."""
        return {s.client for s in self.sessions.values()
                if not s.prepared and (not s.bus or s.bus == self.bus_id)}

    def fds_never_acknowledged(self, keys: Iterable[tuple[str, str]]) -> list[Record]:
        """Journaled fds the surviving fd store does not hold: their PreserveFd was never
        answered (an answer waits for the store), so no VMM counts on them."""
        return self._commit(
            [FdReleased(session=s, token=t,
                        reason="never acknowledged: not in the fd store after a restart")
             for s, t in keys]
        )

    def remedy_for_lost(self) -> str:
        """What the owner or an admin can do about a lost fd now: true in this phase."""
        if self.phase is Phase.NORMAL:
            return ("no copy in the fd store: its owner UnpreserveFds it and preserves it "
                    "again, or an admin drops the session (liveupdatectl drop-session)")
        if self.phase is Phase.PREPARED:
            return ("no copy in the fd store: an admin drops the session (liveupdatectl "
                    "drop-session) or Cancels the update, then its owner preserves it again")
        return ("no copy in the fd store: the update can only be cancelled (liveupdatectl "
                "cancel), then its owner preserves it again")

    def recovery_decided(self, decision: str, evidence: str) -> list[Record]:
        return self._commit([RecoveryDecided(
            decision=decision[:MAX_REASON_LENGTH * 4], evidence=evidence[:MAX_REASON_LENGTH * 4],
            at_usec=self._clock_usec())])

    def fds_lost(self, keys: Iterable[tuple[str, str]]) -> list[Record]:
        return self._commit(
            [
                FdLost(session=s, token=t)
                for s, t in keys
                if not self.sessions[s].fds[t].problem
            ]
        )

    def fds_corrupted(self, found: Iterable[tuple[str, str, int]]) -> list[Record]:
        """Held fds whose journal record was damaged: kept, reported, never handed out."""
        return self._commit(
            [FdCorrupted(session=s, token=t, size=size) for s, t, size in found]
        )

    # ---- host-wide commands ----------------------------------------------------------

    def prepare(self, caller: Caller) -> list[Record]:
        records = self._commit(self._transition(caller, "Prepare"))
        self.in_flight = UnderWay.PREPARE
        return records

    def freeze_laggards(self) -> list[str]:
        """Sessions that asked Freeze to wait for them and are not ready yet."""
        return sorted(n for n, s in self.sessions.items() if s.delay_freeze and not s.ready)

    def missing_dependencies(self) -> list[str]:
        """Every `session/token` that is required, or held, but not really there."""
        problems: list[str] = []
        for name, session in sorted(self.sessions.items()):
            for token, entry in sorted(session.fds.items()):
                if entry.problem == "lost":
                    problems.append(f"{name}/{token} (its fd was lost in a daemon restart)")
                elif entry.problem == "corrupted":
                    problems.append(f"{name}/{token} (its journal record is corrupted)")
                problems += [
                    f"{name}/{req} (required by {token})"
                    for req in entry.requires
                    if req not in session.fds
                ]
        return problems

    def _check_freezable(self) -> None:
        missing = self.missing_dependencies()
        if missing:
            blocking = sorted({problem.split("/", 1)[0] for problem in missing})
            raise DependencyMissing(
                "cannot freeze, missing: " + "; ".join(missing)
                + f". Sessions blocking: {', '.join(blocking)}. Preserve what is missing, "
                "drop a session (Manager.DropSession) or Cancel the update",
                {"command": "Manager.Freeze", "blocking": blocking},
            )
        if self.quarantine:
            held = sorted(self.quarantine.values(), key=lambda q: _quarantine_number(q.id))
            names = ", ".join(f"{q.id} ({q.session}/{q.token})" for q in held)
            raise WrongState(
                f"cannot freeze: quarantined fds ({names}) would not survive the reboot; "
                "an admin retrieves or releases them first (liveupdatectl quarantine "
                "retrieve|release ID, or Manager.RetrieveQuarantined/ReleaseQuarantined)",
                {"command": "Manager.Freeze", "state": self.phase.value,
                 "quarantined": [q.id for q in held]},
            )

    def begin_freeze(self, caller: Caller) -> int:
        """Freeze's checks before it waits on its barrier; the wait is in flight. Returns
        the attempt, which the Freeze shows again when it decides."""
        self._transition(caller, "Freeze")
        self._check_freezable()
        self.in_flight = UnderWay.FREEZE
        self.freeze_attempt += 1
        return self.freeze_attempt

    def check_freeze_attempt(self, attempt: int) -> None:
        """Is the Freeze `attempt` still the one waiting? A Cancel (or Cancel, Prepare
        and another Freeze) may have come during its wait."""
        if self.in_flight is not UnderWay.FREEZE or attempt != self.freeze_attempt:
            moved = f"{self.in_flight} is under way" if self.in_flight else (
                f"the state is {self.phase.value}")
            details: Details = {"command": "Manager.Freeze", "state": self.phase.value}
            if self.in_flight:
                details["under_way"] = self.in_flight.value
            raise WrongState(f"Freeze was interrupted while it waited: {moved}", details)

    def _check_carried_bytes(self, sizes: Mapping[tuple[str, str], int]) -> None:
        """The fds' sizes now (a memfd may have grown since PreserveFd) against each
        uid's budget and the host's: whoever grew past its own budget blocks, by name."""
        by_uid: dict[int, int] = {}
        by_session: dict[str, int] = {}
        for (session, _), size in sizes.items():
            if session in self.sessions:
                uid = self.sessions[session].uid
                by_uid[uid] = by_uid.get(uid, 0) + size
                by_session[session] = by_session.get(session, 0) + size
        limit = self.limits.bytes_per_uid
        over = sorted(
            name for name, s in self.sessions.items()
            if s.uid != 0 and by_uid.get(s.uid, 0) > limit and by_session.get(name, 0)
        )
        total = sum(by_session.values())
        if not over and total <= self.limits.max_preserved_bytes:
            return
        if not over:
            over = sorted(by_session, key=lambda n: -by_session[n])[:3]
            problem = (f"the fds have grown to {total} bytes, over the host's limit of "
                       f"{self.limits.max_preserved_bytes} bytes")
            reached = ("max-preserved-bytes", self.limits.max_preserved_bytes)
        else:
            problem = f"fds have grown past their uid's limit of {limit} bytes"
            reached = ("max-bytes-per-uid", limit)
        raise QuotaExceeded(  # Freeze is the host's administrator's: it may see them all
            f"cannot freeze: {problem}. Sessions blocking: {', '.join(over)}. Shrink them, "
            "drop a session (Manager.DropSession) or Cancel the update",
            {"command": "Manager.Freeze", "blocking": over, "limit": reached[0],
             "maximum": reached[1]},
        )

    def freeze(
        self, caller: Caller, sizes: Mapping[tuple[str, str], int], attempt: int
    ) -> list[Record]:
        """Decide Freeze after the barrier, asking every question again: the phase, a
        Cancel that came meanwhile, the dependencies, the bytes carried now."""
        self.check_freeze_attempt(attempt)
        waiting, self.in_flight = self.in_flight, UnderWay.NOTHING
        try:
            records = self._transition(caller, "Freeze")
            self._check_freezable()
            self._check_carried_bytes(sizes)
        finally:
            self.in_flight = waiting
        return self._commit(records)

    def cancel(self, caller: Caller) -> list[Record]:
        records = self._commit(self._transition(caller, "Cancel"))
        self.in_flight = UnderWay.CANCEL
        return records

    def begin_reboot(
        self,
        caller: Caller,
        boot_id: str,
        soft_reboots: int | None = None,
        kexecs: int | None = None,
        pid1_start: int | None = None,
    ) -> list[Record]:
        """Reboot decided and journaled before the handover is written, with systemd's
        reboot counts where the backend has them (evidence for is_new_boot)."""
        self.check_reboot(caller)  # again: the service awaited systemd's counts since
        records = self._commit([RebootStarted(
            boot_id=boot_id, at_usec=self._clock_usec(), soft_reboots=soft_reboots,
            kexecs=kexecs, by_uid=caller.uid, pid1_start=pid1_start,
        )])
        self.in_flight = UnderWay.REBOOT
        return records

    def check_reboot(self, caller: Caller) -> None:
        """Reboot's checks, before the service asks the backend anything."""
        self._require_admin(caller, "Reboot")
        self._require_phase("Reboot", {Phase.FROZEN})
        self._require_idle("Reboot")

    def reboot_failed(self, reason: str) -> list[Record]:
        """The handover was not completed: a plain FROZEN again."""
        self.done(UnderWay.REBOOT)
        if self.reboot is None:
            return []
        return self._commit([RebootFailed(reason=reason[:MAX_REASON_LENGTH])])

    def simulated_kexec_done(self, boot_id: str) -> list[Record]:
        """The old daemon's last record when no real reboot follows Reboot."""
        return self._commit([KexecSimulated(boot_id=boot_id)])

    def is_new_boot(
        self,
        handover_boot_id: str,
        current_boot_id: str,
        readable: bool = True,
        soft_reboots: int | None = None,
        kexecs: int | None = None,
        pid1_start: int | None = None,
    ) -> bool:
        """Evidence that the kexec happened: the boot that wrote the handover (as the
        journal's RebootStarted says, else as the handover says) is not this one, or the
        old daemon recorded its simulated kexec, or systemd counts more soft-reboots or
        kexecs now (`soft_reboots`, `kexecs`) than RebootStarted recorded: a soft-reboot
        keeps the boot id. Without it a start after Reboot is a restart in FROZEN (a crash
        between Reboot's reply and the kexec). A damaged handover whose record cannot say
        its boot is judged by the journal alone."""
        if self.phase is not Phase.FROZEN:
            return False
        written_by = handover_boot_id
        if self.reboot is not None:
            if readable and self.reboot.boot_id != handover_boot_id:
                return False  # not the handover this journal's Reboot wrote
            written_by = self.reboot.boot_id
            if _grew(self.reboot.soft_reboots, soft_reboots) or _grew(
                self.reboot.kexecs, kexecs
            ):
                return True
            if (self.reboot.pid1_start is not None and pid1_start is not None
                    and pid1_start != self.reboot.pid1_start):
                return True  # PID 1 was started anew: a (container's) boot
        elif not readable:
            return False
        return written_by != current_boot_id or self.kexec_simulated

    def rebooted(self, boot_id: str) -> list[Record]:
        """The handover of the previous boot was found: this is the new kernel."""
        if self.phase is not Phase.FROZEN:
            raise WrongState(f"a handover was found but the journal says {self.phase.value}")
        self.in_flight = UnderWay.NOTHING  # the old boot's Reboot is over
        blackout = max(0, self._clock_usec() - self.freeze_started_usec)
        return self._commit([Rebooted(boot_id=boot_id, blackout_usec=blackout,
                                      at_usec=self._clock_usec())])

    def finish(self, caller: Caller) -> list[Record]:
        transition = self._transition(caller, "Finish")
        dropped: list[Record] = []
        for name in list(self.sessions):
            dropped += self._drop(name, "update finished")
        records = self._commit([*dropped, *transition])
        self.in_flight = UnderWay.FINISH
        self.finish_decided = self.serial
        return records

    def finish_pending(self) -> bool:
        """A Manager.Finish is decided but not yet durable (it may still be taken back),
        or was taken back and its call has not ended yet."""
        return self.in_flight is UnderWay.FINISH and (
            self.durable_serial < self.finish_decided or self.finish_decided in self._taken_back)

    def status_line(self) -> str:
        return (
            f"{self.phase.value}, {len(self.sessions)} sessions, {self.fd_count()} fds"
        )


def _put_back(items: dict[str, V], key: str, value: V, position: int) -> None:
    """Insert `key` where it was (sessions and fds keep the order they came in)."""
    after = list(items.items())[position:]
    for moved, _ in after:
        del items[moved]
    items[key] = value
    items.update(after)


def _quarantine_number(qid: str) -> int:
    return int(qid[1:]) if qid[1:].isdigit() else 0


def _grew(recorded: int | None, now: int | None) -> bool:
    """A count systemd keeps went up since it was recorded (both known)."""
    return recorded is not None and now is not None and now > recorded
