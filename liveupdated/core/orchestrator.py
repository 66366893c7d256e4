"""The orchestrator core: the live-update state machine and every rule about sessions.

Theory of operation. The host moves through four phases:

    NORMAL --Prepare--> PREPARED --Freeze--> FROZEN --Reboot--> (kexec) UPDATED --Finish--> NORMAL
       ^---------------- Cancel (from PREPARED or FROZEN) ------------------'

Each command method checks the caller and the phase, decides, applies its decision to the
in-memory state and returns the records that describe it; the caller must make those
records durable before it acknowledges the command. `apply` is the only mutator, so
replaying a journal through it rebuilds exactly the state that produced it. This module
does no I/O: no files, no fds, no bus; it takes plain values and raises contract errors.
"""

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from liveupdated.core.errors import (
    AccessDenied,
    Corrupted,
    DependencyMissing,
    InvalidArgument,
    NoSuchSession,
    NoSuchToken,
    QuotaExceeded,
    SessionExists,
    TokenExists,
    WrongState,
)
from liveupdated.core.names import check_name
from liveupdated.core.records import (
    FdCorrupted,
    FdLost,
    FdPreserved,
    FdReleased,
    FdRestored,
    FreezeDelaySet,
    PhaseChanged,
    Rebooted,
    Record,
    SessionCreated,
    SessionDropped,
    SessionFinished,
    SessionReady,
)


class Phase(StrEnum):
    NORMAL = "normal"
    PREPARED = "prepared"
    FROZEN = "frozen"
    UPDATED = "updated"


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
    """Defaults never exceed what the Linux 6.19 LUO accepts (744 sessions, 128 fds each)."""

    max_sessions: int = 744
    max_fds_per_session: int = 128
    max_sessions_per_uid: int = 64
    max_preserved_bytes: int = 4 << 40


@dataclass(frozen=True)
class FdFacts:
    """What an fd handler learned about an fd when it was handed over."""

    kind: str
    size: int
    name: str
    seals: int


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


@dataclass
class Session:
    name: str
    uid: int
    unit: str
    client: str
    fds: dict[str, FdEntry] = field(default_factory=dict)
    delay_freeze: bool = False
    ready: bool = False
    finished: bool = False

    @property
    def preserved_bytes(self) -> int:
        return sum(entry.size for entry in self.fds.values())


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
        self._fd_total = 0  # kept up to date by apply: PreserveFd must not scan every fd
        self._bytes_total = 0
        self._clock_usec = clock_usec

    # ---- the one mutator -------------------------------------------------------------

    def apply(self, record: Record) -> None:
        match record:
            case SessionCreated():
                self.sessions[record.session] = Session(
                    record.session, record.uid, record.unit, record.client
                )
            case FdPreserved():
                self.sessions[record.session].fds[record.token] = FdEntry(
                    record.token,
                    record.kind,
                    record.requires,
                    record.size,
                    record.name,
                    record.seals,
                )
                self._count(record.size)
            case FdReleased():
                self._count(-self.sessions[record.session].fds.pop(record.token).size, -1)
            case FdLost():
                self.sessions[record.session].fds[record.token].problem = "lost"
            case FdCorrupted():
                self.sessions[record.session].fds[record.token] = FdEntry(
                    record.token, "memfd", (), record.size, "", 0, problem="corrupted"
                )
                self._count(record.size)
            case FdRestored():
                self.sessions[record.session].fds[record.token].restored = True
            case SessionDropped():
                del self.sessions[record.session]
            case FreezeDelaySet():
                self.sessions[record.session].delay_freeze = record.enabled
            case SessionReady():
                self.sessions[record.session].ready = True
            case SessionFinished():
                self.sessions[record.session].finished = True
            case PhaseChanged():
                self.phase = Phase(record.new)
                if self.phase is Phase.FROZEN:
                    self.freeze_started_usec = record.at_usec
                elif self.phase is Phase.NORMAL:
                    self.freeze_started_usec = 0  # a cancelled freeze starts no blackout
                if self.phase in (Phase.NORMAL, Phase.PREPARED):
                    for session in self.sessions.values():
                        session.ready = False
            case Rebooted():
                self.phase = Phase.UPDATED
                self.last_blackout_usec = record.blackout_usec
                self.handover_boot_id = record.boot_id
                for session in self.sessions.values():
                    session.ready = False

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
        for s in self.sessions.values():
            records.append(
                SessionCreated(session=s.name, uid=s.uid, unit=s.unit, client=s.client)
            )
            for e in s.fds.values():
                if e.problem == "corrupted":
                    records.append(FdCorrupted(session=s.name, token=e.token, size=e.size))
                    continue
                records.append(
                    FdPreserved(session=s.name, token=e.token, kind=e.kind,
                                requires=e.requires, size=e.size, name=e.name, seals=e.seals)
                )
                if e.problem == "lost":
                    records.append(FdLost(session=s.name, token=e.token))
                if e.restored:
                    records.append(FdRestored(session=s.name, token=e.token))
            if s.delay_freeze:
                records.append(FreezeDelaySet(session=s.name, enabled=True))
            if s.ready:
                records.append(SessionReady(session=s.name))
            if s.finished:
                records.append(SessionFinished(session=s.name))
        return records

    def _commit(self, records: list[Record]) -> list[Record]:
        for record in records:
            self.apply(record)
        return records

    # ---- lookups and rules -----------------------------------------------------------

    def session(self, name: str) -> Session:
        try:
            return self.sessions[name]
        except KeyError:
            raise NoSuchSession(f"no session named {name!r}") from None

    def owned_session(self, caller: Caller, name: str) -> Session:
        """The session, if the caller is its owner or root; AccessDenied otherwise."""
        session = self.session(name)
        if caller.uid not in (session.uid, 0):
            raise AccessDenied(
                f"session {name!r} belongs to uid {session.uid}; only it or root may use it"
            )
        return session

    def visible_sessions(self, caller: Caller) -> list[Session]:
        return [s for s in self.sessions.values() if caller.uid in (0, s.uid)]

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
            raise NoSuchToken(f"session {session.name!r} has no token {token!r}") from None

    def _count(self, size: int, fds: int = 1) -> None:
        self._bytes_total += size
        self._fd_total += fds

    def total_preserved_bytes(self) -> int:
        return self._bytes_total

    def fd_count(self) -> int:
        return self._fd_total

    def _require_phase(self, command: str, allowed: Iterable[Phase]) -> None:
        allowed = frozenset(allowed)
        if self.phase not in allowed:
            wanted = " or ".join(sorted(p.value for p in allowed))
            raise WrongState(f"{command} is allowed in state {wanted}, not {self.phase.value}")

    def _require_admin(self, caller: Caller, command: str) -> None:
        if not caller.admin:
            raise AccessDenied(f"{command} drives the host's update; only root may call it")

    def check_transition(self, caller: Caller, command: str) -> None:
        """Raise what `command` (Prepare, Freeze, Cancel, Finish) would raise; no change."""
        self._transition(caller, command)

    def _transition(self, caller: Caller, command: str) -> list[Record]:
        self._require_admin(caller, command)
        allowed, new = PHASE_TRANSITIONS[command]
        self._require_phase(command, allowed)
        return [PhaseChanged(old=self.phase.value, new=new.value, at_usec=self._clock_usec())]

    # ---- session commands ------------------------------------------------------------

    def create_session(self, caller: Caller, name: str) -> list[Record]:
        check_name(name, "session name")
        self._require_phase("CreateSession", SESSION_COMMAND_PHASES["CreateSession"])
        if name in self.sessions:
            raise SessionExists(f"a session named {name!r} already exists; pick another name")
        if len(self.sessions) >= self.limits.max_sessions:
            raise QuotaExceeded(
                f"the host holds the maximum of {self.limits.max_sessions} sessions"
            )
        owned = sum(1 for s in self.sessions.values() if s.uid == caller.uid)
        if caller.uid != 0 and owned >= self.limits.max_sessions_per_uid:
            raise QuotaExceeded(
                f"uid {caller.uid} already has the maximum of "
                f"{self.limits.max_sessions_per_uid} sessions"
            )
        return self._commit(
            [SessionCreated(session=name, uid=caller.uid, unit=caller.unit, client=caller.client)]
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
        new: dict[str, Sequence[str]] = {}
        for token, requires in wanted:
            check_name(token, "token")
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
                    f"session {name!r} already holds token {token!r}; UnpreserveFd it first"
                )
        if len(session.fds) + len(new) > self.limits.max_fds_per_session:
            most = self.limits.max_fds_per_session
            raise QuotaExceeded(
                f"session {name!r} holds the maximum of {most} fds" if len(new) == 1 else
                f"session {name!r} holds {len(session.fds)} fds; {len(new)} more would pass "
                f"the maximum of {most} fds"
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
        self.check_preserve_all(caller, name, [(t, r) for t, r, _ in fds], command)
        size = sum(facts.size for _, _, facts in fds)
        total = self.total_preserved_bytes() + size
        if total > self.limits.max_preserved_bytes:
            raise QuotaExceeded(
                f"preserving {size} bytes would bring the host to {total} bytes, over "
                f"the limit of {self.limits.max_preserved_bytes} bytes"
            )
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
                )
                for token, requires, facts in fds
            ]
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
                f"{name!r}; unpreserve those first"
            )
        return self._commit([FdReleased(session=name, token=token, reason="unpreserved")])

    def check_retrieve_fd(self, caller: Caller, name: str, token: str) -> FdEntry:
        check_name(token, "token")
        session = self.owned_session(caller, name)
        self._require_phase("RetrieveFd", SESSION_COMMAND_PHASES["RetrieveFd"])
        if session.finished:
            raise WrongState(f"session {name!r} is finished; its fds were released")
        entry = self.fd_entry(session, token)
        if entry.problem == "lost":
            raise NoSuchToken(
                f"the fd of {name}/{token} was lost in a daemon restart without an fd store"
            )
        if entry.problem == "corrupted":
            raise Corrupted(
                f"the journal record of {name}/{token} failed its checksum; the fd is held "
                "but never handed out: UnpreserveFd it and preserve it again"
            )
        return entry

    def fd_restored(self, name: str, token: str) -> list[Record]:
        return self._commit([FdRestored(session=name, token=token)])

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

    def client_gone(self, client: str) -> list[Record]:
        """The connection left the bus: before Prepare its sessions go with it."""
        if self.phase is not Phase.NORMAL:
            return []
        records: list[Record] = []
        for name in [n for n, s in self.sessions.items() if s.client == client]:
            records += self._drop(name, "client left the bus before Prepare")
        return self._commit(records)

    def clients(self) -> set[str]:
        return {s.client for s in self.sessions.values()}

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
        return self._commit(self._transition(caller, "Prepare"))

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

    def check_freeze(self, caller: Caller) -> None:
        """Everything Freeze checks before it waits on the barrier; raises, never mutates."""
        self._transition(caller, "Freeze")
        missing = self.missing_dependencies()
        if missing:
            raise DependencyMissing(
                "cannot freeze, missing: " + "; ".join(missing)
                + ". Preserve them or Cancel the update"
            )

    def check_carried_bytes(self, sizes: Mapping[tuple[str, str], int]) -> None:
        """The fds' sizes now (a memfd may have grown since PreserveFd) against the limit."""
        total = sum(sizes.values())
        limit = self.limits.max_preserved_bytes
        if total > limit:
            grown = sorted(
                (size - self.sessions[s].fds[t].size, f"{s}/{t}") for (s, t), size in sizes.items()
            )[-3:]
            raise QuotaExceeded(
                f"the fds have grown to {total} bytes, over the limit of {limit} bytes "
                f"(grown most: {', '.join(name for _, name in reversed(grown))}); "
                "shrink them or Cancel the update"
            )

    def freeze(self, caller: Caller) -> list[Record]:
        self.check_freeze(caller)
        return self._commit(self._transition(caller, "Freeze"))

    def cancel(self, caller: Caller) -> list[Record]:
        return self._commit(self._transition(caller, "Cancel"))

    def check_reboot(self, caller: Caller) -> None:
        self._require_admin(caller, "Reboot")
        self._require_phase("Reboot", {Phase.FROZEN})

    def rebooted(self, boot_id: str) -> list[Record]:
        """The handover of the previous boot was found: this is the new kernel."""
        if self.phase is not Phase.FROZEN:
            raise WrongState(f"a handover was found but the journal says {self.phase.value}")
        blackout = max(0, self._clock_usec() - self.freeze_started_usec)
        return self._commit([Rebooted(boot_id=boot_id, blackout_usec=blackout)])

    def finish(self, caller: Caller) -> list[Record]:
        transition = self._transition(caller, "Finish")
        dropped: list[Record] = []
        for name in list(self.sessions):
            dropped += self._drop(name, "update finished")
        return self._commit([*dropped, *transition])

    def status_line(self) -> str:
        return (
            f"{self.phase.value}, {len(self.sessions)} sessions, {self.fd_count()} fds"
        )
