"""Every command's whole life, from its call to its reply, in one place.

A command is a plan: a generator that decides with the orchestrator, yields each effect
it needs (core/effects.py) and gets that effect's outcome back, or its failure raised at
the yield. Every await the daemon makes for a command is a yield here: the point a
command has reached is the plan's own state, the rule that follows each outcome is
written right after its yield, and nothing decided before an await is trusted after it
(the plan asks the orchestrator again). The service carries out the effects, one table
entry each, and holds no rule.

What every change goes through (`durable`): the decision is applied at once, so that
decisions pipelined behind it see it; its records are enqueued and flushed; only then is
the caller answered. If the journal refuses the flush, the orchestrator takes back every
decision not yet durable (this one and all those taken on it), the held fds follow
(`FollowUndo`), the daemon turns degraded and the caller gets Storage: a refused command
changes nothing. Decisions that must stand whatever the journal says (Cancel while
degraded, a departed client's drop, a restore, a failed reboot) are taken under
`core.unconditional()`.

This module does no I/O; tests drive a plan by hand (tests/core/test_plans.py).
"""

import contextlib
import itertools
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from liveupdated.core.effects import (
    ASYNC,
    Announce,
    BackendFinish,
    BackendFinishSession,
    BootFacts,
    Claim,
    CloseFds,
    CloseReleased,
    Compact,
    Deadline,
    DiscardHandover,
    Dup,
    Effect,
    Enqueue,
    Flush,
    FollowUndo,
    FreezeStarted,
    Hold,
    Inspect,
    LetGo,
    Log,
    LogRestored,
    Notify,
    PrepareHandover,
    RebootCounts,
    RebootNotFollowed,
    Refused,
    Release,
    ReleaseSpares,
    Restore,
    RestoreAhead,
    Rewrite,
    SettleRestores,
    Sizes,
    StoreBarrier,
    TakeCarried,
    Unheld,
    WaitChange,
    WriteHandover,
    WriteRestoredLog,
)
from liveupdated.core.errors import Corrupted, Storage, Timeout
from liveupdated.core.orchestrator import (
    Caller,
    FdEntry,
    Orchestrator,
    Phase,
    Session,
    UnderWay,
)
from liveupdated.core.records import FdReleased, Record
from liveupdated.core.recovery import Key, quarantine_key

T = TypeVar("T")
Plan = Generator[Effect, Any, T]


def advance(
    plan: Plan[T], outcome: Any, failure: BaseException | None,
    carry_out: Callable[[Effect], Any],
) -> tuple[Effect | None, T | None, BaseException | None]:
    """Send an outcome into a plan (or raise its failure at the yield), and carry out by
    `carry_out` every effect after it that takes no await. Returns the effect the plan
    waits on, or, once it ended, None with its value or its error. The service runs plans
    by this, and so does the tests' in-memory world."""
    while True:
        try:
            effect = plan.throw(failure) if failure is not None else plan.send(outcome)
        except StopIteration as end:
            return None, end.value, None
        except BaseException as exc:
            return None, None, exc
        if type(effect) in ASYNC:
            return effect, None, None
        try:
            outcome, failure = carry_out(effect), None
        except Exception as exc:
            outcome, failure = None, exc

HANDOVER_TIMEOUT_EXTENSION = "EXTEND_TIMEOUT_USEC=30000000"


# ---- what every change goes through ------------------------------------------------------


def writable(core: Orchestrator) -> Plan[None]:
    """Before a change: Storage while degraded, unless the whole state can be written
    anew now (a rewrite of the journal), which ends the degraded mode. While a rewrite
    is under way, a change waits for the calls waiting on it: calls are decided in the
    order they came, also when one of them ends the degraded mode."""
    while core.rewriting and not core.storage_problem:
        yield WaitChange()
    if not core.storage_problem:
        return
    if core.journal_unreadable:
        raise Storage(
            f"the journal could not be read at start ({core.journal_unreadable}); no "
            "change is accepted until the daemon restarts with a readable journal. "
            "Every fd from the fd store is held (quarantined)"
        )
    core.rewriting += 1
    try:
        covered: int = yield Rewrite()
    except Refused as exc:
        core.storage_problem = exc.problem
        raise Storage(
            f"the daemon cannot write its journal ({exc.problem}); no change is accepted "
            "until it can. Held fds stay held; RetrieveFd and Cancel work"
        ) from exc
    finally:
        core.rewriting -= 1
    core.durable_through(covered)  # the rewrite wrote every decision taken until then
    if core.storage_problem:  # (another call's rewrite may have ended it already)
        yield Log("warning", "storage_recovered", {"was": core.storage_problem})
        core.storage_problem = ""


def degrade(core: Orchestrator, problem: str) -> Plan[Storage]:
    """The journal refused a write: the daemon runs degraded (never exits: a failed unit
    may lose its fd store, the only copy of the VMs' memory). The error to answer."""
    if not core.storage_problem:
        yield Log("critical", "storage_failed", {
            "error": problem,
            "hint": "changes are refused until the journal can be written again"})
    core.storage_problem = problem
    return Storage(
        f"the journal could not be written ({problem}); the change may not be recorded. "
        "Held fds stay held; RetrieveFd and Cancel still work"
    )


def flush(core: Orchestrator, decision: int | None = None) -> Plan[None]:
    """Until everything decided so far is durable: in the journal, each released fd
    closed, and each held fd in systemd's fd store. `decision`: the serial the caller's
    own decision ended at, which must be durable, and not taken back meanwhile."""
    target = core.serial
    try:
        yield Flush()
    except Refused as exc:
        yield FollowUndo(tuple(core.roll_back()))
        with core.unconditional():  # a departure a taken-back Prepare had kept from them
            dropped = core.departed_meanwhile()
        if dropped:
            yield from unconditional_drop(core, dropped)
        error = yield from degrade(core, exc.problem)
        taken_back = decision is not None and core.taken_back(decision)
        if decision is None or taken_back or decision > core.durable_serial:
            raise error from exc
        target = core.durable_serial  # a rewrite of the journal had it: durable all the same
        yield StoreBarrier()  # answered only once systemd has its fds, as ever
    else:
        taken_back = decision is not None and core.taken_back(decision)
        core.durable_through(target)
        if taken_back:
            # The journal refused a change decided before this one: both were taken back
            # (a later rewrite of the journal made this flush itself succeed).
            raise Storage(
                "the journal refused a change this one was decided on; nothing of it was "
                "kept: retry"
            )
    yield CloseReleased(target)


def compact(core: Orchestrator) -> Plan[bool]:
    """The journal rewritten as the live state: what it holds, replay reads (on the
    blackout path), so it stays proportional to what is held. False: it failed, and the
    daemon is degraded."""
    try:
        covered: int = yield Compact()
    except Refused as exc:
        yield from degrade(core, exc.problem)
        return False
    core.durable_through(covered)  # every decision in the state is in the new file
    return True


def durable(core: Orchestrator, records: Sequence[Record], *, undoable: bool = True) -> Plan[None]:
    """Make a decision's records durable, then tell whoever listens. Released fds leave
    the fd store with the decision (a call decided next may store a new fd under the same
    name); each is closed once its release is durable, or held and stored again if the
    journal refuses it. A crash in between reports the fd lost: it was being let go."""
    batch = tuple(records)
    yield LetGo(batch, core.serial, undoable)
    yield Enqueue(batch)
    yield from flush(core, core.serial if batch else None)
    yield Announce(batch)


def unconditional_drop(core: Orchestrator, records: Sequence[Record]) -> Plan[None]:
    """Sessions dropped whatever the journal says (their client is gone: nobody waits for
    an answer and the owner cannot come back): fds released at once, the drop durable
    with the next flush (a crash before it drops them again at restart)."""
    batch = tuple(records)
    yield LetGo(batch, core.serial, undoable=False)
    yield Enqueue(batch)
    yield Announce(batch)


# ---- sessions ------------------------------------------------------------------------------


def create_session(core: Orchestrator, caller: Caller, name: str) -> Plan[str]:
    """The session's name: durable, though a Close pipelined behind it may end it."""
    yield from writable(core)
    yield from durable(core, core.create_session(caller, name))
    return name


def retrieve_session(core: Orchestrator, caller: Caller, name: str) -> Plan[Session]:
    session = core.retrieve_session(caller, name)
    yield from restore_ahead(core)  # the VMMs ask for their fds next
    return session


def preserve_fds(
    core: Orchestrator,
    caller: Caller,
    session: str,
    fds: Sequence[tuple[str, int, Sequence[str]]],
    command: str,
) -> Plan[None]:
    """(token, fd, requires) of each fd: all preserved, or none. The plan owns every fd:
    all held, or all closed. Answered once each fd is in the journal and systemd has it
    (a retry after a crash in between wins: the journal records which file it was)."""
    try:
        if core.storage_problem or core.rewriting:
            yield from writable(core)
        core.check_preserve_all(caller, session, [(t, r) for t, _, r in fds], command)
        facts = yield Inspect(tuple((token, fd) for token, fd, _ in fds))
        records = core.preserve_fds(
            caller, session,
            [(token, requires, fact)
             for (token, _, requires), fact in zip(fds, facts, strict=True)],
            command,
        )
    except GeneratorExit:
        raise  # closed unfinished: nothing may be yielded now
    except BaseException:  # refused, failed or cancelled: the fds are closed
        yield CloseFds(tuple(fd for _, fd, _ in fds))
        raise
    yield Hold(tuple(((session, token), fd) for token, fd, _ in fds))
    yield Enqueue(tuple(records))
    yield from flush(core, core.serial)
    yield Announce(tuple(records))


def unpreserve_fd(core: Orchestrator, caller: Caller, session: str, token: str) -> Plan[None]:
    yield from writable(core)
    yield from durable(core, core.unpreserve_fd(caller, session, token))


def delay_freeze(core: Orchestrator, caller: Caller, session: str, enable: bool) -> Plan[None]:
    yield from writable(core)
    yield from durable(core, core.delay_freeze(caller, session, enable))


def ready_for_freeze(core: Orchestrator, caller: Caller, session: str) -> Plan[None]:
    yield from writable(core)
    yield from durable(core, core.ready_for_freeze(caller, session))


def close_session(core: Orchestrator, caller: Caller, session: str) -> Plan[None]:
    yield from writable(core)
    yield from durable(core, core.close_session(caller, session))


def client_left(core: Orchestrator, client: str) -> Plan[None]:
    """The connection left the bus: its pre-Prepare sessions go at once, so that a
    Prepare that follows cannot carry them."""
    with core.unconditional():
        records = core.client_gone(client)
    yield from unconditional_drop(core, records)


def departed_elsewhere(core: Orchestrator) -> Plan[None]:
    """At start: sessions of clients of another bus that never went through Prepare."""
    with core.unconditional():
        records = core.departed_elsewhere()
    yield from unconditional_drop(core, records)


def drop_session(core: Orchestrator, caller: Caller, session: str, reason: str) -> Plan[None]:
    yield from writable(core)
    records = core.drop_session(caller, session, reason)
    yield Log("warning", "session_dropped_by_admin", {
        "session": session, "uid": caller.uid, "sender": caller.client, "reason": reason})
    yield from durable(core, records)


def finish_session(core: Orchestrator, caller: Caller, session: str) -> Plan[None]:
    """The backend's part runs once: by this call, or by a Manager.Finish decided during
    its awaits, which waits for this one to end and then lets go of everything."""
    yield from writable(core)
    records = core.finish_session(caller, session)
    core.session_finishes += 1
    try:
        yield from durable(core, records)
        yield SettleRestores(session)  # its fds let go while being restored: closed
        yield WriteRestoredLog()
        yield ReleaseSpares(session)  # its Finish is durable: the old boot's go
        while core.finish_pending():  # a Manager.Finish lets go of all once durable
            yield WaitChange()
        if core.phase is Phase.UPDATED and core.in_flight is not UnderWay.FINISH:
            released = tuple(r.token for r in records if isinstance(r, FdReleased))
            yield BackendFinishSession(session, released)
        yield StoreBarrier()
    finally:
        core.session_finishes -= 1


# ---- handing fds back ----------------------------------------------------------------------


def retrieve_fds(
    core: Orchestrator,
    caller: Caller,
    session: str,
    tokens: Sequence[str],
    command: str,
    *,
    carried_in_store: bool,
) -> Plan[list[int]]:
    """New fds for the caller, one per token in order (dups of those held), all or none;
    each complete and checked, and its restore decided, before it is handed out.
    `carried_in_store`: the backend's fds came back in the fd store (fdstore)."""
    entries = core.check_retrieve_fds(caller, session, tokens, command)
    keys = tuple((session, token) for token in tokens)
    unheld = set((yield Unheld(keys)))
    restored: dict[str, int] = {}  # bytes of each fd restored for this call
    if unheld:
        missing = [(key, entry) for key, entry in zip(keys, entries, strict=True)
                   if key in unheld]
        core.check_restorable(missing[0][0])
        yield from restore_ahead(core)
        if carried_in_store:
            restored = yield from take_carried(core, missing)
        else:
            restored = yield from rebuild(core, caller, missing)
        yield LogRestored(session, restored)
        # Ask again: a Finish may have come while the restores were journaled.
        core.check_retrieve_fds(caller, session, tokens, command)
    fds: list[int] = yield Dup(keys)
    if not restored:  # restored fds are logged by session, a moment's worth together
        yield Log("info", "fd_retrieved" if len(tokens) == 1 else "fds_retrieved", {
            "session": session,
            **({"token": tokens[0]} if len(tokens) == 1 else {"tokens": list(tokens)}),
            "phase": core.phase.value})
    return fds


def restore_ahead(core: Orchestrator) -> Plan[None]:
    """Once per boot, on the first call that needs a restore (or RetrieveSession): every
    fd still to restore, round robin over the sessions, each in its preserved order (the
    VMMs ask at once, each for its first fd, then its second...)."""
    if core.restoring_ahead or core.phase is not Phase.UPDATED:
        return
    core.restoring_ahead = True
    wanted = [[((name, token), entry) for token, entry in s.fds.items() if not entry.problem]
              for name, s in core.sessions.items() if not s.finished]
    unheld = set((yield Unheld(tuple(key for row in wanted for key, _ in row))))
    rows = [[item for item in row if item[0] in unheld] for row in wanted]
    yield RestoreAhead(tuple(
        item for row in itertools.zip_longest(*rows) for item in row if item is not None))


def take_carried(
    core: Orchestrator, missing: Sequence[tuple[Key, FdEntry]]
) -> Plan[dict[str, int]]:
    """The fdstore backend: each fd is the very file systemd carried, in the fd store under
    its name already; a dup is kept and handed out at once. Its FdRestored is durable
    with the next group commit, after the reply: until then recovery takes the fd in the
    store for one not yet retrieved, which to the journal it still is."""
    kept: dict[Key, tuple[int, int]]
    kept, failure = yield TakeCarried(tuple(missing))
    records: list[Record] = []
    for key, entry in missing:
        if key in kept and not entry.restored:
            dev, ino = kept[key]
            with core.unconditional():  # the fd is held and served either way
                records += core.fd_restored(*key, dev=dev, ino=ino)
    yield Enqueue(tuple(records))
    if failure is not None:  # those kept before it are recorded all the same
        raise failure
    return {key[1]: entry.size for key, entry in missing if key in kept}


def rebuild(
    core: Orchestrator, caller: Caller, missing: Sequence[tuple[Key, FdEntry]]
) -> Plan[dict[str, int]]:
    """Rebuild the fds from the handover (or take those rebuilt ahead), hold them and make
    their restore durable in one group commit; the size of each, by token."""
    yield Restore(tuple(missing))
    # Ask again: a Finish or Close may have come while the fds were rebuilt (they are let
    # go then, and closed by the restores).
    entries = [core.check_retrieve_fd(caller, *key) for key, _ in missing]
    kept: dict[Key, tuple[int, int] | None] = yield Claim(tuple(key for key, _ in missing))
    records: list[Record] = []
    restored: dict[str, int] = {}
    for (key, _), entry in zip(missing, entries, strict=True):
        if key not in kept:
            raise Corrupted(f"{key[0]}/{key[1]} was restored but is not held")
        identity = kept[key]
        if identity is None:
            continue  # a concurrent RetrieveFd kept it first
        restored[key[1]] = entry.size
        if not entry.restored:
            with core.unconditional():  # the fd is held and served either way
                records += core.fd_restored(*key, dev=identity[0], ino=identity[1])
    if records and core.storage_problem:
        yield Enqueue(tuple(records))  # served all the same: the fd is held either way
    elif records:
        with contextlib.suppress(Storage):  # degraded then; the fds are served all the same
            yield from durable(core, records)
    return restored


# ---- quarantine: fds the journal cannot explain -------------------------------------------


def retrieve_quarantined(core: Orchestrator, caller: Caller, qid: str) -> Plan[int]:
    found = core.quarantined(caller, qid)
    yield Log("warning", "quarantined_fd_retrieved", {
        "id": qid, "session": found.session, "token": found.token, "uid": caller.uid})
    fds: list[int] = yield Dup((quarantine_key(qid),))
    return fds[0]


def release_quarantined(core: Orchestrator, caller: Caller, qid: str) -> Plan[None]:
    """Only the quarantined entry goes (its own key and store name): never a live fd."""
    yield from writable(core)
    found = core.quarantined(caller, qid)
    yield from durable(core, core.release_quarantined(caller, qid))
    yield Release(quarantine_key(qid))
    yield Log("warning", "quarantined_fd_released", {
        "id": qid, "session": found.session, "token": found.token, "uid": caller.uid})


# ---- the host's update ----------------------------------------------------------------------


def prepare(core: Orchestrator, caller: Caller) -> Plan[None]:
    """Sessions and fds fixed now; the backend's brownout work follows. A backend that
    refuses it takes the update back to normal."""
    yield from writable(core)
    records = core.prepare(caller)
    try:
        try:
            yield from durable(core, records)
            yield PrepareHandover()
        finally:
            core.done(UnderWay.PREPARE)
    except Exception:
        if core.phase is Phase.PREPARED:  # the backend refused: back to normal
            with core.unconditional():
                cancelled = core.cancel(caller)
            with contextlib.suppress(Storage):  # a restart comes back in prepared: Cancel
                yield from durable(core, cancelled, undoable=False)
            core.done(UnderWay.CANCEL)
        raise


def freeze(core: Orchestrator, caller: Caller, timeout: float) -> Plan[None]:
    """The barrier first: every session that asked Freeze to wait reports ready within
    `timeout` seconds; then every question is asked again, on the fds' sizes now."""
    yield from writable(core)
    attempt = core.begin_freeze(caller)
    try:
        if core.freeze_laggards():
            yield FreezeStarted()  # the moment VMMs that delay Freeze quiesce
        deadline: float = yield Deadline(timeout)
        while core.freeze_laggards():
            if (yield WaitChange(deadline)):
                core.check_freeze_attempt(attempt)  # a Cancel may have come meanwhile
            elif core.freeze_laggards():
                raise Timeout(
                    f"Freeze waited {timeout:g}s for ReadyForFreeze from: "
                    f"{', '.join(core.freeze_laggards())}; the state stays prepared (retry "
                    "Freeze, DropSession a laggard, or Cancel)"
                )
        sizes = yield Sizes()
        yield from durable(core, core.freeze(caller, sizes, attempt))
    finally:
        core.done(UnderWay.FREEZE, attempt)


def cancel(core: Orchestrator, caller: Caller) -> Plan[None]:
    """Served while degraded: a Cancel the journal cannot record leaves the journal in
    PREPARED or FROZEN, which a restart takes back safely. The handover is deleted only
    once the Cancel is durable."""
    with core.unconditional():
        records = core.cancel(caller)
    try:
        try:
            yield from durable(core, records)
        except Storage:
            yield Log("error", "cancel_not_journaled", {
                "hint": "a restart comes back in prepared or frozen with the handover "
                        "kept; Cancel again then"})
            return
        try:
            yield DiscardHandover()
        except Refused as exc:  # the Cancel is durable: the next start discards it
            yield Log("error", "handover_discard_failed", {
                "error": exc.problem,
                "hint": "the update is cancelled; the handover is deleted at the next start"})
    finally:
        core.done(UnderWay.CANCEL)


def reboot(core: Orchestrator, caller: Caller) -> Plan[int]:
    """Write the handover for the next kernel; the daemon then stops as the old kernel.
    A failure leaves no partial handover and the state FROZEN (Cancel or retry)."""
    yield from writable(core)
    core.check_reboot(caller)
    counts = yield RebootCounts()  # where the backend's evidence of a new boot rests
    boot, pid1_start = yield BootFacts()
    records = core.begin_reboot(
        caller, boot,
        soft_reboots=counts.soft_reboots if counts is not None else None,
        kexecs=counts.kexecs if counts is not None else None,
        pid1_start=pid1_start,
    )
    try:
        yield from durable(core, records)
    except BaseException:
        with core.unconditional():
            core.reboot_failed("the reboot could not be journaled")
        raise
    yield Notify((HANDOVER_TIMEOUT_EXTENSION, "STATUS=writing handover"))
    try:
        carried: int = yield WriteHandover()
    except Exception as exc:
        yield from handover_failed(core, exc)
        if isinstance(exc, Refused):
            raise Storage(
                f"the handover could not be written ({exc.problem}); nothing of it is "
                "left, the state is still frozen: retry Reboot or Cancel"
            ) from exc
        raise
    fds = core.fd_count()
    yield Log("info", "handover_written", {"fds": fds, "bytes": carried})
    with core.unconditional():  # for the update history only: the exit writes it
        yield Enqueue(tuple(core.handover_written(fds, carried)))
    return carried


def handover_failed(core: Orchestrator, exc: Exception) -> Plan[None]:
    yield Log("error", "reboot_failed", {"error": str(exc) or exc.__class__.__name__})
    try:
        yield DiscardHandover()
    except Refused as discard:
        yield Log("error", "handover_discard_failed", {"error": discard.problem})
    with core.unconditional():
        records = core.reboot_failed(f"the handover could not be written: {exc}")
    with contextlib.suppress(Storage):  # frozen either way; a restart takes the Reboot back
        yield from durable(core, records)


def reboot_did_not_follow(core: Orchestrator, reason: str) -> Plan[None]:
    """The reboot action failed, or no reboot came: the daemon stays, frozen, with the
    handover kept; Reboot may be called again, or Cancel."""
    yield Log("critical", "reboot_failed", {
        "reason": reason,
        "hint": "the state stays frozen and the handover is kept: Reboot again or Cancel"})
    with core.unconditional():
        records = core.reboot_failed(reason)
    with contextlib.suppress(Storage):  # the state is frozen either way
        yield from durable(core, records)
    yield Notify((f"STATUS={core.status_line()}; reboot failed: {reason}",))
    yield RebootNotFollowed(reason)


def finish(core: Orchestrator, caller: Caller) -> Plan[None]:
    """The update is over: every session dropped, the backend lets go, the journal is
    compacted (only after the store has let go of what it no longer needs)."""
    yield from writable(core)
    records = core.finish(caller)
    try:
        yield from durable(core, records)
        while core.session_finishes:  # a Session.Finish under way lets go first, in order
            yield WaitChange()
        yield SettleRestores()  # fds let go while being restored: closed
        yield WriteRestoredLog()
        yield ReleaseSpares()
        yield BackendFinish()
        yield StoreBarrier()
        # The Finish is durable: a compaction refused now only makes the daemon degraded.
        yield from compact(core)
    finally:
        core.done(UnderWay.FINISH)
