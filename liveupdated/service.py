"""The live-update service: each contract operation as core decision, journal, effects.

It runs a command through the pure core, makes the resulting records durable, then
carries out their effects on held fds, the backend and whoever listens (the bus edge).
It knows nothing of D-Bus; it never acknowledges a change that is not in the journal.
It holds no lock across an await: each decision is one synchronous call into the core,
which keeps the in-flight states, and a command that awaited asks the core again.

A disk that refuses a write does not stop the daemon (a failed unit may lose its fd
store, the only copy of the VMs' memory): it runs degraded, refusing changes with
Error.Storage while RetrieveFd and Cancel are still served, and comes back by itself
once a compaction of the whole state succeeds.
"""

import asyncio
import contextlib
import contextvars
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from liveupdated.backends import Backend, Key
from liveupdated.core.errors import (
    Corrupted,
    Storage,
    Timeout,
    UnsupportedFd,
)
from liveupdated.core.orchestrator import (
    Caller,
    FdEntry,
    FdFacts,
    Orchestrator,
    Phase,
    Session,
)
from liveupdated.core.records import (
    FdPreserved,
    FdReleased,
    FdRestored,
    PhaseChanged,
    Rebooted,
    Record,
    SessionCreated,
    SessionDropped,
)
from liveupdated.core.recovery import quarantine_key
from liveupdated.durable import describe
from liveupdated.fds import memfd
from liveupdated.journal import Journal
from liveupdated.restores import Restores
from liveupdated.systemd import Notifier, boot_id, pid1_start
from liveupdated.vault import Vault

log = structlog.get_logger("liveupdated")

STATUS_INTERVAL = 0.1  # seconds


@dataclass
class Listeners:
    """Callbacks of the bus edge; the service calls them after a change is durable."""

    session_added: Callable[[Session], None] = lambda s: None
    session_removed: Callable[[str], None] = lambda n: None
    session_changed: Callable[[Session], None] = lambda s: None
    phase_changed: Callable[[str, str], None] = lambda old, new: None
    freeze_started: Callable[[], None] = lambda: None
    reboot_failed: Callable[[str], None] = lambda reason: None


@dataclass
class FreezeBarrier:
    """Wakes a waiting Freeze whenever a session reports ready (or the phase moves)."""

    changed: asyncio.Event = field(default_factory=asyncio.Event)


class LiveUpdate:
    def __init__(
        self,
        core: Orchestrator,
        journal: Journal,
        vault: Vault,
        backend: Backend,
        notifier: Notifier,
        freeze_timeout: float = 10.0,
    ) -> None:
        self.core = core
        self.journal = journal
        self.vault = vault
        self.backend = backend
        self.notifier = notifier
        self.freeze_timeout = freeze_timeout
        self.listeners = Listeners()
        self.barrier = FreezeBarrier()
        self.reboot_requested = asyncio.Event()
        self._changed: dict[str, None] = {}  # sessions to announce ("" = only STATUS=)
        self.storage_problem = ""  # why the journal cannot be written: degraded if set
        # The journal could not be read at start: degraded until a restart reads it (a
        # rewrite of what this daemon knows would replace records it could not read).
        self.journal_unreadable = ""
        self._compaction: asyncio.Future[None] | None = None
        self._last_progress = 0.0
        self._last_status = -STATUS_INTERVAL
        self._status_timer: asyncio.TimerHandle | None = None
        self.restores = Restores(backend.retrieve_fd, backend.carried_size)
        self._restored_log: dict[str, dict[str, int]] = {}  # session -> token -> bytes
        self._restoring_ahead = False
        self._session_finishes: set[asyncio.Future[None]] = set()  # Session.Finish under way
        # Decisions up to this serial are durable; released fds wait here for theirs.
        self._durable_serial = core.serial
        core.durable_through(core.serial)
        self._releasing: deque[tuple[int, Key, int]] = deque()

    # ---- plumbing --------------------------------------------------------------------

    async def _durable(self, records: Sequence[Record], *, undoable: bool = True) -> None:
        """Journal the records the core already applied, then carry out their effects."""
        self._let_go(records, undoable=undoable)
        self.journal.enqueue(records)
        await self.settle(records)

    def _let_go(self, records: Sequence[Record], *, undoable: bool = True) -> None:
        """Drop released fds from the fd store at once, with the decision: a call decided
        next may store a new fd under the same name. The fd itself is closed once the
        release is durable (or at once for an unconditional decision); if the journal
        refuses it, it is held and stored again. A crash before the journal has the
        release reports the fd lost; it was being let go."""
        for record in records:
            if isinstance(record, FdReleased):
                key = (record.session, record.token)
                self.restores.drop(key)
                if not undoable:
                    self.vault.release(key)
                    continue
                fd = self.vault.take(key)
                if fd is not None:
                    self._releasing.append((self.core.serial, key, fd))

    async def settle(self, records: Sequence[Record]) -> None:
        """Wait until enqueued records are durable, then carry out their effects."""
        await self.flush()
        self._effects(records)

    async def flush(self) -> None:
        """Until what the core decided so far is durable: in the journal, and each held fd
        in the fd store. A journal that cannot be written makes the daemon degraded
        (Storage), never makes it exit."""
        target = self.core.serial
        try:
            await self.journal.flush()
        except OSError as exc:
            self._roll_back()
            raise self._degrade(exc) from exc
        self._durable_serial = max(self._durable_serial, target)
        self.core.durable_through(target)
        while self._releasing and self._releasing[0][0] <= target:
            os.close(self._releasing.popleft()[2])
        await self.notifier.stored()
        if self._compaction is None and self.journal.needs_compaction():
            self._compaction = asyncio.ensure_future(self._compact())

    async def _compact(self) -> None:
        """The journal rewritten as the live state once it has grown past its bound:
        replay, on the blackout path, stays proportional to what is held."""
        try:
            await self.journal.compact(self.core.snapshot)
            log.info("journal_compacted", bytes=self.journal.size)
        except OSError as exc:
            self._degrade(exc)
        finally:
            self._compaction = None

    def _roll_back(self) -> None:
        """The journal refused what was decided since it last answered: every such
        decision is undone in the core, and the held fds and the store follow (a PreserveFd
        lets its fd go, an UnpreserveFd's fd is held and stored again), so that a refused
        command changes nothing and a later rewrite of the journal writes no ghost."""
        for change, key in self.core.roll_back_after(self._durable_serial):
            if change == "unpreserved":
                self.restores.drop(key)
                self.vault.release(key)
                continue
            kept = [item for item in self._releasing if item[1] == key]
            if kept:
                self._releasing.remove(kept[-1])
                self.vault.keep(key, kept[-1][2])

    def _degrade(self, exc: OSError) -> Storage:
        problem = describe(exc)
        if not self.storage_problem:
            log.critical("storage_failed", error=problem,
                         hint="changes are refused until the journal can be written again")
        self.storage_problem = problem
        return Storage(
            f"the journal could not be written ({problem}); the change may not be "
            "recorded. Held fds stay held; RetrieveFd and Cancel still work"
        )

    async def writable(self) -> None:
        """Before a change: Storage while degraded, unless the whole state can be written
        anew now (a compaction), which ends the degraded mode."""
        if not self.storage_problem:
            return
        if self.journal_unreadable:
            raise Storage(
                f"the journal could not be read at start ({self.journal_unreadable}); no "
                "change is accepted until the daemon restarts with a readable journal. "
                "Every fd from the fd store is held (quarantined)"
            )
        try:
            await self.journal.rewrite(self.core.snapshot)
        except OSError as exc:
            self.storage_problem = describe(exc)
            raise Storage(
                f"the daemon cannot write its journal ({self.storage_problem}); no change "
                "is accepted until it can. Held fds stay held; RetrieveFd and Cancel work"
            ) from exc
        log.warning("storage_recovered", was=self.storage_problem)
        self.storage_problem = ""

    def _effects(self, records: Sequence[Record]) -> None:
        changed: dict[str, None] = {}
        for record in records:
            match record:
                case SessionCreated():
                    self.listeners.session_added(self.core.sessions[record.session])
                    log.info("session_created", session=record.session, uid=record.uid,
                             unit=record.unit)
                case FdPreserved():
                    changed[record.session] = None
                case FdReleased():
                    changed[record.session] = None
                    log.info("fd_released", session=record.session, token=record.token,
                             reason=record.reason)
                case SessionDropped():
                    changed.pop(record.session, None)
                    self.barrier.changed.set()  # a dropped laggard may release a Freeze
                    self.listeners.session_removed(record.session)
                    log.info("session_dropped", session=record.session, reason=record.reason)
                case PhaseChanged():
                    self.barrier.changed.set()
                    self.listeners.phase_changed(record.old, record.new)
                    changed.update(dict.fromkeys(self.core.sessions))
                    log.info("state_changed", old=record.old, new=record.new)
                case Rebooted():
                    changed.update(dict.fromkeys(self.core.sessions))
                case FdRestored():
                    pass  # no property or STATUS= figure changes: nothing to announce
                case _:
                    if hasattr(record, "session"):
                        changed[record.session] = None
                    self.barrier.changed.set()
        if not self._changed:
            asyncio.get_running_loop().call_soon(self._announce)
        self._changed.update(changed)
        self._changed.setdefault("", None)

    def _announce(self) -> None:
        """PropertiesChanged and STATUS= once per turn of the loop, not once per call:
        the PreserveFd calls that one group commit completes share them."""
        for name in self._changed:
            if name in self.core.sessions:
                self.listeners.session_changed(self.core.sessions[name])
        self._changed.clear()
        loop = asyncio.get_running_loop()
        wait = self._last_status + STATUS_INTERVAL - loop.time()
        if wait <= 0:
            self._send_status()
        elif self._status_timer is None:
            self._status_timer = loop.call_later(wait, self._send_status)

    def _send_status(self) -> None:
        """STATUS= at most every STATUS_INTERVAL: a burst of calls needs only its last."""
        self._status_timer = None
        self._last_status = asyncio.get_running_loop().time()
        self.notifier.status(self.core.status_line())

    # ---- sessions --------------------------------------------------------------------

    async def create_session(self, caller: Caller, name: str) -> Session:
        await self.writable()
        await self._durable(self.core.create_session(caller, name))
        return self.core.sessions[name]

    def retrieve_session(self, caller: Caller, name: str) -> Session:
        session = self.core.retrieve_session(caller, name)
        self._restore_ahead()  # the VMMs ask for their fds next
        return session

    async def preserve_fd(
        self, caller: Caller, session: str, token: str, fd: int, requires: Sequence[str]
    ) -> None:
        """Takes ownership of `fd`: it is kept, or closed on every failure path."""
        await self.preserve_fds(caller, session, [(token, fd, requires)], "PreserveFd")

    async def preserve_fds(
        self,
        caller: Caller,
        session: str,
        fds: Sequence[tuple[str, int, Sequence[str]]],
        command: str,
    ) -> None:
        """(token, fd, requires) of each fd: all preserved, or none. Takes ownership of
        every fd: all kept, or all closed."""
        try:
            await self.writable()
        except BaseException:
            for _, fd, _ in fds:
                os.close(fd)
            raise
        records = self.begin_preserve_fds(caller, session, fds, command)
        await self.flush()
        self.finish_preserve_fds(records)

    def begin_preserve_fd(
        self, caller: Caller, session: str, token: str, fd: int, requires: Sequence[str]
    ) -> list[Record]:
        return self.begin_preserve_fds(caller, session, [(token, fd, requires)], "PreserveFd")

    def begin_preserve_fds(
        self,
        caller: Caller,
        session: str,
        fds: Sequence[tuple[str, int, Sequence[str]]],
        command: str,
    ) -> list[Record]:
        """PreserveFd(s) up to the journal: decided, held and enqueued, durable after the
        next flush. Takes ownership of the fds: all kept, or all closed on every failure."""
        try:
            if self.storage_problem:  # the fast path's check; writable() may end it
                raise Storage(f"the daemon cannot write its journal ({self.storage_problem})")
            self.core.check_preserve_all(caller, session, [(t, r) for t, _, r in fds], command)
            inspected = [(t, r, _inspect(t, fd, named=len(fds) > 1)) for t, fd, r in fds]
            records = self.core.preserve_fds(caller, session, inspected, command)
        except BaseException:
            for _, fd, _ in fds:
                os.close(fd)
            raise
        for token, fd, _ in fds:
            self.vault.keep((session, token), fd)
        self.journal.enqueue(records)
        return records

    def finish_preserve_fds(self, records: Sequence[Record]) -> None:
        """After the flush that made records of begin_preserve_fds durable; one log line per
        session for all the fds the flush carried (a line each would cost more than the
        rest of the call)."""
        self._effects(records)
        by_session: dict[str, list[FdPreserved]] = {}
        for record in records:
            if isinstance(record, FdPreserved):
                by_session.setdefault(record.session, []).append(record)
        for session, preserved in by_session.items():
            log.info("fds_preserved", session=session, tokens=[r.token for r in preserved],
                     bytes=sum(r.size for r in preserved),
                     requires={r.token: r.requires for r in preserved if r.requires})

    async def unpreserve_fd(self, caller: Caller, session: str, token: str) -> None:
        await self.writable()
        await self._durable(self.core.unpreserve_fd(caller, session, token))

    async def retrieve_fd(self, caller: Caller, session: str, token: str) -> int:
        """A new fd for the caller (a dup of the one held); the caller must close it."""
        (fd,) = await self.retrieve_fds(caller, session, [token], "RetrieveFd")
        return fd

    async def retrieve_fds(
        self, caller: Caller, session: str, tokens: Sequence[str], command: str
    ) -> list[int]:
        """New fds for the caller, one per token in order (dups of those held), all or
        none; the caller must close them. Each is complete and checked, and its restore
        durable, before it is handed out."""
        entries = self.core.check_retrieve_fds(caller, session, tokens, command)
        keys = [(session, token) for token in tokens]
        restored: dict[str, int] = {}  # bytes of each fd restored for this call
        missing = [(key, entry) for key, entry in zip(keys, entries, strict=True)
                   if key not in self.vault]
        if missing:
            if self.core.phase is not Phase.UPDATED:
                key = missing[0][0]
                raise Corrupted(f"{key[0]}/{key[1]} is journaled but its fd is not held")
            self._restore_ahead()
            restored = await self._restore(caller, missing)
            self._log_restored(session, restored)
            # Ask again: a Finish may have come while it was journaled.
            self.core.check_retrieve_fds(caller, session, tokens, command)
        fds: list[int] = []
        try:
            for key in keys:
                fds.append(self.vault.dup(key))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if restored:  # logged by session, every STATUS_INTERVAL: _log_restored
            return fds
        if len(tokens) == 1:
            log.info("fd_retrieved", session=session, token=tokens[0],
                     phase=self.core.phase.value)
        else:
            log.info("fds_retrieved", session=session, tokens=list(tokens),
                     phase=self.core.phase.value)
        return fds

    def _log_restored(self, session: str, restored: dict[str, int]) -> None:
        """One `fds_restored` line per session for the fds restored for callers within
        STATUS_INTERVAL: after the reboot every VMM asks at once, one call in flight
        each, and a line a call would cost a quarter of the call."""
        if not self._restored_log:
            asyncio.get_running_loop().call_later(
                STATUS_INTERVAL, self._write_restored_log, context=contextvars.Context())
        self._restored_log.setdefault(session, {}).update(restored)

    def _write_restored_log(self) -> None:
        for session, restored in self._restored_log.items():
            log.info("fds_restored", session=session, tokens=list(restored),
                     bytes=sum(restored.values()))
        self._restored_log.clear()

    def _restore_ahead(self) -> None:
        """Once per boot, on the first call that needs a restore (or RetrieveSession):
        every fd still to restore, in order, by the backend's workers. Only where the
        backend says it is worth it (the kernel's retrieve is cheap)."""
        if self._restoring_ahead or self.core.phase is not Phase.UPDATED:
            return
        self._restoring_ahead = True
        if not getattr(self.backend, "restores_ahead", False):
            return
        # Round robin over the sessions, each in its preserved order: the VMMs ask at
        # once, each for its first fd, then its second...
        per_session = [
            [((name, token), entry) for token, entry in session.fds.items()
             if not entry.problem and (name, token) not in self.vault]
            for name, session in self.core.sessions.items() if not session.finished
        ]
        self.restores.ahead(
            fd for row in itertools.zip_longest(*per_session) for fd in row if fd is not None
        )

    async def _restore(
        self, caller: Caller, missing: Sequence[tuple[Key, FdEntry]]
    ) -> dict[str, int]:
        """Rebuild the fds (or take those rebuilt ahead), keep them, and make their
        restore durable in one group commit; the size of each, by token."""
        if self.backend.keeps_fd_store:
            return self._take_carried(missing)
        outcomes = await asyncio.gather(
            *[self.restores.wanted(key, entry) for key, entry in missing],
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        # Ask again: a Finish or Close may have come while the fds were rebuilt (they are
        # let go then, and closed by the Restores).
        entries = [self.core.check_retrieve_fd(caller, *key) for key, _ in missing]
        records: list[Record] = []
        restored: dict[str, int] = {}
        for (key, _), entry in zip(missing, entries, strict=True):
            fd = self.restores.claim(key)
            if fd is None or key in self.vault:  # a concurrent RetrieveFd kept it first
                if fd is not None:
                    os.close(fd)
                if key not in self.vault:
                    raise Corrupted(f"{key[0]}/{key[1]} was restored but is not held")
                continue
            self.vault.keep(key, fd)
            restored[key[1]] = entry.size
            if not entry.restored:
                st = os.fstat(fd)
                with self.core.unconditional():  # the fd is held and served either way
                    records += self.core.fd_restored(*key, dev=st.st_dev, ino=st.st_ino)
        if records:
            if self.storage_problem:  # served all the same: the fd is held either way
                self.journal.enqueue(records)
            else:
                # A journal that fails now makes the daemon degraded; the fds are held
                # and served all the same, as in degraded mode.
                with contextlib.suppress(Storage):
                    await self._durable(records)
        return restored

    def _take_carried(self, missing: Sequence[tuple[Key, FdEntry]]) -> dict[str, int]:
        """The fdstore backend: each fd is the very file systemd carried, in the fd store
        under its name already. A dup of the backend's is kept, not stored again (systemd
        would only compare it with every fd of the store to drop it), and handed out at
        once. Its FdRestored is made durable after the reply, by the next group commit:
        until then recovery takes the fd in the store for one not yet retrieved, which to
        the journal it still is, and a RetrieveFd after a restart dups it again."""
        records: list[Record] = []
        restored: dict[str, int] = {}
        for key, entry in missing:
            if key in self.vault:  # the same token twice in one call
                continue
            fd = self.backend.retrieve_fd(key, entry)
            self.vault.keep(key, fd, store=False)
            restored[key[1]] = entry.size
            if not entry.restored:
                st = os.fstat(fd)
                with self.core.unconditional():  # the fd is held and served either way
                    records += self.core.fd_restored(*key, dev=st.st_dev, ino=st.st_ino)
        self.journal.enqueue(records)
        return restored

    async def delay_freeze(self, caller: Caller, session: str, enable: bool) -> None:
        await self.writable()
        await self._durable(self.core.delay_freeze(caller, session, enable))

    async def ready_for_freeze(self, caller: Caller, session: str) -> None:
        await self.writable()
        await self._durable(self.core.ready_for_freeze(caller, session))

    async def finish_session(self, caller: Caller, session: str) -> None:
        """The backend's part runs once, by this call or by a Manager.Finish that came
        during its awaits: that one waits for this to end, then lets go of everything."""
        await self.writable()
        records = self.core.finish_session(caller, session)
        done = asyncio.get_running_loop().create_future()
        self._session_finishes.add(done)
        try:
            await self._durable(records)
            await self.restores.settle(session)  # its fds let go while being restored
            self._write_restored_log()
            released = [r.token for r in records if isinstance(r, FdReleased)]
            self.vault.release_spares(session)  # its Finish is durable: the old boot's go
            if self.core.phase is Phase.UPDATED and self.core.in_flight != "Finish":
                await asyncio.to_thread(self.backend.finish_session, session, released)
            await self.notifier.stored()
        finally:
            self._session_finishes.discard(done)
            done.set_result(None)

    async def close_session(self, caller: Caller, session: str) -> None:
        await self.writable()
        await self._durable(self.core.close_session(caller, session))

    def client_left(self, client: str) -> None:
        """The connection left the bus: its pre-Prepare sessions go at once, so that a
        Prepare that follows cannot carry them. Nobody waits for an acknowledgement and
        the owner cannot come back, so the fds are released before the journal's next
        flush makes the drop durable (a crash in between drops them again at restart)."""
        with self.core.unconditional():
            records = self.core.client_gone(client)
        self._let_go(records, undoable=False)
        self.journal.enqueue(records)
        self._effects(records)

    def drop_departed_elsewhere(self) -> None:
        """At start: sessions of clients of another bus that never went through Prepare."""
        with self.core.unconditional():
            records = self.core.departed_elsewhere()
        self._let_go(records, undoable=False)
        self.journal.enqueue(records)
        self._effects(records)

    async def drop_session(self, caller: Caller, session: str, reason: str) -> None:
        await self.writable()
        records = self.core.drop_session(caller, session, reason)
        log.warning("session_dropped_by_admin", session=session, uid=caller.uid,
                    sender=caller.client, reason=reason)
        await self._durable(records)

    # ---- quarantine: fds the journal cannot explain ---------------------------------

    def retrieve_quarantined(self, caller: Caller, qid: str) -> int:
        found = self.core.quarantined(caller, qid)
        log.warning("quarantined_fd_retrieved", id=qid, session=found.session,
                    token=found.token, uid=caller.uid)
        return self.vault.dup(quarantine_key(qid))

    async def release_quarantined(self, caller: Caller, qid: str) -> None:
        """Only the quarantined entry goes (its own key and store name): never a live fd."""
        await self.writable()
        found = self.core.quarantined(caller, qid)
        await self._durable(self.core.release_quarantined(caller, qid))
        self.vault.release(quarantine_key(qid))
        log.warning("quarantined_fd_released", id=qid, session=found.session,
                    token=found.token, uid=caller.uid)

    # ---- the host's update -----------------------------------------------------------

    def _held(self) -> tuple[dict[Key, int], dict[Key, FdEntry]]:
        entries = {
            (name, token): entry
            for name, session in self.core.sessions.items()
            for token, entry in session.fds.items()
        }
        fds = {key: fd for key, fd in self.vault.items().items() if key in entries}
        return fds, entries

    async def prepare(self, caller: Caller) -> None:
        await self.writable()
        records = self.core.prepare(caller)  # sessions and fds fixed now
        try:
            try:
                await self._durable(records)
                await asyncio.to_thread(self.backend.prepare_handover, *self._held())
            finally:
                self.core.done("Prepare")
        except Exception:
            if self.core.phase is Phase.PREPARED:  # the backend refused: back to normal
                with contextlib.suppress(Storage):
                    with self.core.unconditional():
                        records = self.core.cancel(caller)
                    await self._durable(records, undoable=False)
                self.core.done("Cancel")
            raise

    async def freeze(self, caller: Caller) -> None:
        await self.writable()
        attempt = self.core.begin_freeze(caller)
        if self.core.freeze_laggards():  # the moment VMMs that delay Freeze quiesce
            self.listeners.freeze_started()
        try:
            await self._wait_for_barrier(attempt)
            sizes = {key: os.fstat(fd).st_size for key, fd in self._held()[0].items()}
            await self._durable(self.core.freeze(caller, sizes, attempt))
        finally:
            self.core.done("Freeze", attempt)

    async def _wait_for_barrier(self, attempt: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.freeze_timeout
        while self.core.freeze_laggards():
            self.barrier.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                laggards = ", ".join(self.core.freeze_laggards())
                raise Timeout(
                    f"Freeze waited {self.freeze_timeout:g}s for ReadyForFreeze from: "
                    f"{laggards}; the state stays prepared (retry Freeze, DropSession a "
                    "laggard, or Cancel)"
                )
            try:
                async with asyncio.timeout(remaining):
                    await self.barrier.changed.wait()
            except TimeoutError:
                continue
            self.core.check_freeze_attempt(attempt)

    async def cancel(self, caller: Caller) -> None:
        """Served while degraded: a Cancel the journal cannot record leaves the journal
        in PREPARED or FROZEN, which a restart takes back safely."""
        with self.core.unconditional():  # served while degraded: it stands
            records = self.core.cancel(caller)
        try:
            try:
                await self._durable(records)
            except Storage:
                # The handover stays: it is deleted only once a Cancel is durable.
                log.error("cancel_not_journaled", hint="a restart comes back in "
                          "prepared or frozen with the handover kept; Cancel again then")
                return
            await asyncio.to_thread(self.backend.discard_handover)
        finally:
            self.core.done("Cancel")

    async def reboot(self, caller: Caller) -> int:
        """Write the handover for the next kernel; the daemon then stops as the old kernel.
        A failure leaves no partial handover and the state FROZEN (Cancel or retry)."""
        await self.writable()
        self.core.check_reboot(caller)
        # systemd's reboot counts, where the backend's evidence of a new boot rests on them.
        counts = await asyncio.to_thread(self.backend.reboot_counts)
        records = self.core.begin_reboot(
            caller, boot_id(),
            soft_reboots=counts.soft_reboots if counts is not None else None,
            kexecs=counts.kexecs if counts is not None else None,
            pid1_start=pid1_start(),
        )
        try:
            await self._durable(records)
        except BaseException:
            with self.core.unconditional():
                self.core.reboot_failed("the reboot could not be journaled")
            raise
        fds, entries = self._held()
        self.notifier.notify("EXTEND_TIMEOUT_USEC=30000000", "STATUS=writing handover")
        try:
            carried = await asyncio.to_thread(
                self.backend.write_handover, fds, entries, boot_id(), self._report_progress
            )
        except BaseException as exc:
            await self._reboot_failed(exc)
            if isinstance(exc, OSError):
                raise Storage(
                    f"the handover could not be written ({describe(exc)}); nothing "
                    "of it is left, the state is still frozen: retry Reboot or Cancel"
                ) from exc
            raise
        log.info("handover_written", fds=len(entries), bytes=carried)
        # For the update history only: not waited for (the exit writes it).
        with self.core.unconditional():
            self.journal.enqueue(self.core.handover_written(len(entries), carried))
        return carried

    async def _reboot_failed(self, exc: BaseException) -> None:
        log.error("reboot_failed", error=str(exc) or exc.__class__.__name__)
        try:
            await asyncio.to_thread(self.backend.discard_handover)
        except OSError as discard:
            log.error("handover_discard_failed", error=describe(discard))
        with self.core.unconditional():
            records = self.core.reboot_failed(f"the handover could not be written: {exc}")
        with contextlib.suppress(Storage):
            await self._durable(records)

    async def reboot_did_not_follow(self, reason: str) -> None:
        """The reboot action failed, or no reboot came: the daemon stays, frozen, with
        the handover kept; Reboot may be called again, or Cancel."""
        log.critical("reboot_failed", reason=reason,
                     hint="the state stays frozen and the handover is kept: Reboot again "
                          "or Cancel")
        with self.core.unconditional():
            records = self.core.reboot_failed(reason)
        with contextlib.suppress(Storage):
            await self._durable(records)
        self.notifier.status(f"{self.core.status_line()}; reboot failed: {reason}")
        self.listeners.reboot_failed(reason)

    def _report_progress(self, carried: int) -> None:
        """From the writer thread: keep systemd's start/stop timeout from firing."""
        now = time.monotonic()
        if now - self._last_progress >= 1.0:
            self._last_progress = now
            self.notifier.notify(
                "EXTEND_TIMEOUT_USEC=30000000", f"STATUS=writing handover: {carried >> 20} MiB"
            )

    async def finish(self, caller: Caller) -> None:
        await self.writable()
        records = self.core.finish(caller)
        try:
            await self._durable(records)
            # A Session.Finish under way ends first: the backend lets go once, in order.
            await asyncio.gather(*self._session_finishes)
            await self.restores.settle()  # fds let go while being restored: closed
            self._write_restored_log()
            self.vault.release_spares()
            await asyncio.to_thread(self.backend.finish)
            # The store emptied before the journal forgets what was released in it.
            await self.notifier.stored()
            await self.journal.compact(self.core.snapshot)
        finally:
            self.core.done("Finish")


def _inspect(token: str, fd: int, named: bool) -> FdFacts:
    """The memfd's facts; an error about one fd of several says which token it is for."""
    try:
        return memfd.inspect(fd)
    except UnsupportedFd as exc:
        if named:
            raise UnsupportedFd(f"fd of token {token!r}: {exc}") from None
        raise
