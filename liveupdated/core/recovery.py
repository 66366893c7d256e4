"""Recovery: what a start makes of the replayed journal, the fds systemd passed back, the
handover and the evidence of a new boot. Pure: facts in, records and effects out; it
never touches an fd, a file or the bus (the daemon gathers the facts and carries out the
effects, in the order given).

The invariant: an fd, or a copy of it, is closed or deleted only because of a durable
record of its owner's or the admin's decision (Finish, UnpreserveFd, DropSession,
ReleaseQuarantined, a client that left before Prepare), or because the same content is
proven held elsewhere (the very same file is held under the same name). Everything else
is kept: held under its key, kept as a spare until the update's Finish, or quarantined
under an id of its own. When the evidence disagrees (no sign of a new boot, yet the fds
are gone from the store), the handover is used and the state stays frozen; every such
decision is logged with its evidence and noted in the update's history.

The table of what is done for each combination is in docs/DESIGN.md ("Recovery").
"""

from dataclasses import dataclass, field

from liveupdated.core.names import is_name
from liveupdated.core.orchestrator import FdEntry, Orchestrator, Phase
from liveupdated.core.records import Record

Key = tuple[str, str]  # (session, token): the backends' too
UNKNOWN_BOOT = "unknown"  # a handover that cannot say which boot wrote it
QUARANTINE = "@q"  # the session part of a quarantined fd's key: no session has an "@"


def quarantine_key(qid: str) -> Key:
    return (QUARANTINE, qid)


@dataclass(frozen=True)
class StoredFd:
    """One fd systemd passed back (LISTEN_FDS), by its position there."""

    index: int
    name: str  # its FDNAME
    dev: int
    ino: int
    size: int

    @property
    def file(self) -> tuple[int, int]:
        return (self.dev, self.ino)


@dataclass(frozen=True)
class HandoverFound:
    """What the previous boot handed over, as found (metadata and sizes only: checksums
    are checked when an fd is rebuilt from it)."""

    boot_id: str  # UNKNOWN_BOOT: it cannot say
    keys: frozenset[Key]
    damage: str = ""  # it exists but fails its checks
    in_store: bool = False  # the fd store itself is the handover (fdstore backend)


@dataclass(frozen=True)
class BootEvidence:
    """Signs of the boot this start runs in. In a container behind the unit's sandboxing
    the boot id may be the host's; PID 1's start time still changes at each boot of the
    container (not at a restart of the daemon, nor at a soft-reboot, which the counts show)."""

    boot_id: str
    pid1_start: int | None = None
    soft_reboots: int | None = None
    kexecs: int | None = None

    def describe(self) -> str:
        return (f"boot id {self.boot_id}, PID 1 started at tick {self.pid1_start}, "
                f"soft-reboots {self.soft_reboots}, kexecs {self.kexecs}")


@dataclass(frozen=True)
class StartFacts:
    stored: tuple[StoredFd, ...] = ()
    has_store: bool = False  # this daemon runs with systemd's fd store
    store_survived: bool = False  # the previous daemon's journal mark came back in it
    journal_damaged: bool = False
    handover: HandoverFound | None = None
    boot: BootEvidence = field(default_factory=lambda: BootEvidence(UNKNOWN_BOOT))
    carrier_keeps_store: bool = False  # the backend's carried fds come back in the store


# ---- effects: what the daemon carries out, in order -------------------------------------


@dataclass(frozen=True)
class Hold:
    """Keep stored fd `index` under `key`; it is in the store under that name already."""

    index: int
    key: Key


@dataclass(frozen=True)
class HoldRenamed:
    """Keep stored fd `index` under `key`, stored anew under that key's name (a new
    opening of the file, so that systemd keeps both names until the old one is dropped)."""

    index: int
    key: Key


@dataclass(frozen=True)
class Adopt:
    """The carrier's (fdstore): the old boot's fd, dup'd by RetrieveFd, released by Finish."""

    index: int
    key: Key


@dataclass(frozen=True)
class Spare:
    """The old boot's own fd after the reboot, whose content the handover carries: kept
    (never handed out) until the durable Finish of its session releases it."""

    index: int
    key: Key


@dataclass(frozen=True)
class Close:
    """The very same file is held under the same name already: this opening is spare."""

    index: int
    why: str


@dataclass(frozen=True)
class ForgetName:
    """FDSTOREREMOVE a name none of the held fds is stored under any more."""

    name: str


@dataclass(frozen=True)
class Rebuild:
    """Rebuild `key` from the handover into the daemon and the store (checksums checked);
    a failure makes it Corrupted, the handover stays."""

    key: Key


@dataclass(frozen=True)
class DiscardHandover:
    why: str


@dataclass(frozen=True)
class KeepHandover:
    why: str


Effect = Hold | HoldRenamed | Adopt | Spare | Close | ForgetName | Rebuild | DiscardHandover \
    | KeepHandover


@dataclass(frozen=True)
class Event:
    """A line to log: level, event name and its fields (the evidence)."""

    level: str
    event: str
    fields: tuple[tuple[str, object], ...] = ()


@dataclass
class Recovery:
    records: list[Record] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def log(self, level: str, event: str, **fields: object) -> None:
        self.events.append(Event(level, event, tuple(fields.items())))


def recover(core: Orchestrator, facts: StartFacts, now_usec: int = 0) -> Recovery:
    """Decide the start. Applies its records to `core` (as every core decision does) and
    returns them with the effects, which the daemon carries out in order."""
    out = Recovery()
    _decide_boot(core, facts, out)
    held = _match_stored(core, facts, out)
    _account_missing(core, facts, held, out)
    _decide_handover(core, facts, out)
    del now_usec
    return out


def _previous_had_store(core: Orchestrator) -> bool:
    return core.started is not None and core.started.fd_store


def _decide_boot(core: Orchestrator, facts: StartFacts, out: Recovery) -> None:
    """FROZEN after a Reboot: is this the new boot? Only on evidence."""
    if core.phase is not Phase.FROZEN:
        return
    handover = facts.handover
    boot = facts.boot
    if handover is not None and core.is_new_boot(
        handover.boot_id, boot.boot_id, readable=handover.boot_id != UNKNOWN_BOOT,
        soft_reboots=boot.soft_reboots, kexecs=boot.kexecs, pid1_start=boot.pid1_start,
    ):
        previous = handover.boot_id
        if previous == UNKNOWN_BOOT and core.reboot is not None:
            previous = core.reboot.boot_id
        if handover.damage:
            out.log("error", "handover_damaged", error=handover.damage,
                    hint="every RetrieveFd of it fails with Corrupted; Finish releases it")
        else:
            out.log("info", "handover_found", previous_boot=previous, fds=len(handover.keys),
                    evidence=boot.describe(), soft_reboots=boot.soft_reboots,
                    kexecs=boot.kexecs, pid1_start=boot.pid1_start)
        out.records += core.rebooted(previous)
        return
    if core.reboot is not None:
        out.log("critical", "reboot_interrupted", evidence=boot.describe(),
                hint="no evidence of a new boot: the daemon restarted before the reboot; "
                     "the state stays frozen and the handover is kept (Reboot or Cancel)")
        out.records += core.reboot_failed(
            "the daemon restarted before the reboot (no evidence of a new boot: "
            f"{boot.describe()})")


def _match_stored(core: Orchestrator, facts: StartFacts, out: Recovery) -> dict[Key, StoredFd]:
    """Each stored fd to what it is: held, adopted, spare, quarantined, or a second
    opening of a file already held. Returns what is held (or adopted) under each key."""
    matcher = _Matcher(core, facts, out)
    for fd in facts.stored:
        matcher.match(fd)
    return matcher.finish()


class _Matcher:
    """The state of _match_stored while it goes through the stored fds in order."""

    def __init__(self, core: Orchestrator, facts: StartFacts, out: Recovery) -> None:
        self.core, self.facts, self.out = core, facts, out
        self.held: dict[Key, StoredFd] = {}
        self.spares: set[tuple[str, tuple[int, int]]] = set()
        self.keep_names: set[str] = set()
        self.drop_names: set[str] = set()
        self.quarantined: list[tuple[StoredFd, str, str, str]] = []  # fd, session, token, why
        self.legacy = {(q.session, q.token): q for q in core.quarantine.values() if q.legacy}
        self.updated = core.phase is Phase.UPDATED

    def hold(self, fd: StoredFd, key: Key, *, adopt: bool = False) -> None:
        self.held[key] = fd
        self.out.effects.append(Adopt(fd.index, key) if adopt else Hold(fd.index, key))
        self.keep_names.add(fd.name)

    def spare(self, fd: StoredFd, key: Key) -> None:
        if (fd.name, fd.file) in self.spares:
            self.out.effects.append(Close(fd.index, "the same file is kept as a spare"))
            return
        self.spares.add((fd.name, fd.file))
        self.out.effects.append(Spare(fd.index, key))
        self.keep_names.add(fd.name)

    def quarantine(self, fd: StoredFd, session: str, token: str, why: str) -> None:
        self.quarantined.append((fd, session, token, why))
        self.drop_names.add(fd.name)

    def second(self, fd: StoredFd, key: Key, what: str) -> None:
        """Another fd under the name of one held already: the same file is spare, any
        other file is kept for the admin."""
        if self.held[key].file == fd.file:
            self.out.effects.append(Close(fd.index, f"the same file is {what} under this name"))
        else:
            self.quarantine(fd, *key, f"a second file under the name of a {what} fd: a "
                            "PreserveFd that was never acknowledged")

    def match(self, fd: StoredFd) -> None:
        session, slash, token = fd.name.partition("/")
        if session == QUARANTINE:
            key = quarantine_key(token)
            if token in self.core.quarantine and key not in self.held:
                self.hold(fd, key)
            elif key in self.held and self.held[key].file == fd.file:
                self.out.effects.append(Close(fd.index, "the same file is held under this name"))
            else:
                self.quarantine(fd, session, token,
                                f"stored as {fd.name!r}, which the journal does not record")
        elif not (slash and is_name(session) and is_name(token)):
            self.quarantine(fd, "unnamed", fd.name[:64] or "unnamed", f"stored as {fd.name!r}")
        elif session in self.core.sessions and token in self.core.sessions[session].fds:
            self.match_entry(fd, (session, token), self.core.sessions[session].fds[token])
        else:
            self.match_unknown(fd, (session, token))

    def match_unknown(self, fd: StoredFd, key: Key) -> None:
        session, token = key
        if (session, token, *fd.file) in self.core.released_files:
            # Its release (Finish, UnpreserveFd, DropSession) is durable: the store's
            # message to let it go was lost in a crash.
            self.out.effects.append(Close(fd.index, "its release is journaled"))
            self.drop_names.add(fd.name)
            return
        legacy = self.legacy.pop(key, None)
        if legacy is not None:  # quarantined by an earlier version, by its name
            qkey = quarantine_key(legacy.id)
            self.held[qkey] = fd
            self.out.effects.append(HoldRenamed(fd.index, qkey))
            self.drop_names.add(fd.name)
        elif session in self.core.sessions and self.facts.journal_damaged:
            self.out.log("error", "fd_record_corrupted", session=session, token=token,
                         bytes=fd.size)
            self.out.records += self.core.fds_corrupted([(session, token, fd.size)])
            self.hold(fd, key)
        else:
            why = ("its session's records were lost" if session not in self.core.sessions
                   else "the journal does not record it: a PreserveFd that was never "
                        "acknowledged")
            self.quarantine(fd, session, token, why)

    def match_entry(self, fd: StoredFd, key: Key, entry: FdEntry) -> None:
        carried = self.updated and not entry.restored
        if carried and self.facts.carrier_keeps_store:
            if key in self.held:
                self.second(fd, key, "carried")
            else:
                self.hold(fd, key, adopt=True)
        elif carried:  # the handover is the source of its content now
            self.spare(fd, key)
        elif self.updated and entry.ino and (entry.dev, entry.ino) != fd.file:
            # Restored before a restart: the journal names the rebuilt file; any other
            # under its name is the old boot's own, which the handover stood for.
            self.spare(fd, key)
        elif key in self.held:
            self.second(fd, key, "held")
        elif entry.ino and (entry.dev, entry.ino) != fd.file and entry.problem != "corrupted":
            self.quarantine(fd, *key, "not the file the journal records under this name: a "
                            "PreserveFd that was never acknowledged")
        else:
            self.hold(fd, key)

    def finish(self) -> dict[Key, StoredFd]:
        found: list[tuple[str, str, int, str]] = []
        quarantined_files = {fd.file for key, fd in self.held.items() if key[0] == QUARANTINE}
        for fd, session, token, reason in self.quarantined:
            if fd.file in quarantined_files:  # a second opening of a file kept already
                self.out.effects.append(Close(fd.index, "the same file is quarantined"))
                continue
            quarantined_files.add(fd.file)
            qid = self.core.next_quarantine_id(len(found))
            key = quarantine_key(qid)
            self.held[key] = fd
            self.out.effects.append(HoldRenamed(fd.index, key))
            self.out.log("error", "fd_quarantined", id=qid, session=session, token=token,
                         bytes=fd.size, reason=reason, fdname=fd.name,
                         hint="an admin retrieves or releases it: liveupdatectl quarantine")
            found.append((session, token, fd.size, reason))
        self.out.records += self.core.quarantine_fds(found)
        for legacy in self.legacy.values():
            self.out.log("warning", "quarantined_fd_not_stored", id=legacy.id)
        for name in sorted(self.drop_names - self.keep_names):
            self.out.effects.append(ForgetName(name))
        return self.held


def _account_missing(
    core: Orchestrator, facts: StartFacts, held: dict[Key, StoredFd], out: Recovery
) -> None:
    """Journaled fds that did not come back in the store."""
    if core.phase is Phase.UPDATED:
        return  # the handover (or the carrier) is their source now
    missing = [
        (name, token, entry)
        for name, session in core.sessions.items()
        for token, entry in session.fds.items()
        if (name, token) not in held and not entry.problem
    ]
    if not missing:
        return
    handover = facts.handover
    usable = (handover is not None and not handover.damage and not handover.in_store
              and core.phase is Phase.FROZEN)
    evidence = (f"{len(missing)} journaled fds not in the fd store (the previous daemon "
                f"{'had' if _previous_had_store(core) else 'had no'} fd store; its journal "
                f"mark {'came back' if facts.store_survived else 'did not come back'}); "
                f"{facts.boot.describe()}")
    rebuilt: list[Key] = []
    unacknowledged: list[tuple[str, str]] = []
    lost: list[tuple[str, str]] = []
    for name, token, _ in missing:
        key = (name, token)
        if usable and handover is not None and key in handover.keys:
            rebuilt.append(key)
        elif _previous_had_store(core) and facts.store_survived and facts.has_store:
            unacknowledged.append(key)  # acknowledged means stored: it never was
        else:
            lost.append(key)
    if rebuilt:
        decision = (f"the handover is used: {len(rebuilt)} fds rebuilt from it, the state "
                    "stays frozen (Reboot again or Cancel)")
        out.log("critical", "handover_used", fds=len(rebuilt), evidence=evidence,
                decision=decision)
        out.records += core.recovery_decided(decision, evidence)
        out.effects += [Rebuild(key) for key in rebuilt]
    if unacknowledged:
        for name, token in unacknowledged:
            out.log("warning", "fd_never_acknowledged", session=name, token=token,
                    hint="its PreserveFd was never answered; preserve it again")
        out.records += core.fds_never_acknowledged(unacknowledged)
    if lost:
        remedy = core.remedy_for_lost()
        for name, token in lost:
            out.log("error", "fd_lost", session=name, token=token, hint=remedy)
        out.records += core.fds_lost(lost)


def _decide_handover(core: Orchestrator, facts: StartFacts, out: Recovery) -> None:
    """A handover found outside its update: deleted only when the journal is intact and
    says the update it was written for ended (its Cancel or Finish is durable)."""
    handover = facts.handover
    if handover is None or handover.in_store or core.phase in (Phase.UPDATED, Phase.FROZEN):
        if handover is not None and not handover.in_store and core.phase is Phase.FROZEN:
            out.effects.append(KeepHandover("frozen: it is kept until a Cancel is durable or "
                                            "a new handover is complete"))
        return
    if facts.journal_damaged or core.started is None:
        why = ("the journal was damaged" if facts.journal_damaged
               else "the journal has no history")
        out.log("error", "handover_kept", phase=core.phase.value,
                reason=f"{why}: it may be the only copy of a VM's memory",
                hint="an admin inspects and removes it by hand")
        out.effects.append(KeepHandover(why))
        return
    out.effects.append(DiscardHandover(f"the journal says {core.phase.value}: the update it "
                                       "was written for was cancelled or finished"))


__all__ = [
    "QUARANTINE",
    "Adopt",
    "BootEvidence",
    "Close",
    "DiscardHandover",
    "Effect",
    "ForgetName",
    "HandoverFound",
    "Hold",
    "HoldRenamed",
    "KeepHandover",
    "Rebuild",
    "Recovery",
    "Spare",
    "StartFacts",
    "StoredFd",
    "quarantine_key",
    "recover",
]
