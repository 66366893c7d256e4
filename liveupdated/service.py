"""The live-update service: it carries out what the core's plans ask, and decides nothing.

Each contract operation is a plan in core/commands.py: a generator that decides with the
orchestrator and yields effects (core/effects.py). This module runs plans (`run`, and
`start` with `run_together` for the PreserveFd fast path's group commit) and carries out
each effect by one entry of its table (`_table`): the journal, the fds held (the vault),
the restores, the backend, systemd, the listeners of the bus edge and the log. It knows
nothing of D-Bus, and no rule: which effect follows which outcome is the plan's.
"""

import asyncio
import contextvars
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from liveupdated.backends import Backend, Key
from liveupdated.core import commands
from liveupdated.core import effects as fx
from liveupdated.core.commands import Plan
from liveupdated.core.errors import UnsupportedFd
from liveupdated.core.orchestrator import Caller, FdEntry, FdFacts, Orchestrator, Session
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
from liveupdated.durable import describe
from liveupdated.fds import memfd
from liveupdated.journal import Journal
from liveupdated.restores import Restores
from liveupdated.systemd import Notifier, boot_id, pid1_start
from liveupdated.vault import Vault

log = structlog.get_logger("liveupdated")

STATUS_INTERVAL = 0.1  # seconds
T = TypeVar("T")


@dataclass
class Listeners:
    """Callbacks of the bus edge; the service calls them after a change is durable."""

    session_added: Callable[[Session], None] = lambda s: None
    session_removed: Callable[[str], None] = lambda n: None
    session_changed: Callable[[Session], None] = lambda s: None
    phase_changed: Callable[[str, str], None] = lambda old, new: None
    freeze_started: Callable[[], None] = lambda: None
    reboot_failed: Callable[[str], None] = lambda reason: None


class Running(Generic[T]):
    """A plan under way: the effect it waits on (None once it ended), then its result."""

    def __init__(self, plan: Plan[T], context: dict[str, Any] | None = None) -> None:
        self.plan = plan
        self.context = context or {}  # log fields its effects are carried out with
        self.pending: fx.Effect | None = None
        self.value: T | None = None
        self.error: BaseException | None = None

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # set when the plan returned


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
        self.reboot_requested = asyncio.Event()
        self.changed = asyncio.Event()  # the core's state moved: waiting plans look again
        self.restores = Restores(backend.retrieve_fd, backend.carried_size)
        self._changed: dict[str, None] = {}  # sessions to announce ("" = only STATUS=)
        # To log: the fds preserved by session and by the log fields of their calls.
        self._preserved: dict[tuple[str, tuple[tuple[str, Any], ...]], list[FdPreserved]] = {}
        self._compaction: asyncio.Future[None] | None = None
        self._last_progress = 0.0
        self._last_status = -STATUS_INTERVAL
        self._status_timer: asyncio.TimerHandle | None = None
        self._restored_log: dict[str, dict[str, int]] = {}  # session -> token -> bytes
        # Released fds wait here, with their decision's serial, until it is durable.
        self._releasing: deque[tuple[int, Key, int | None]] = deque()
        core.durable_through(core.serial)
        self._context: dict[str, Any] = {}  # log fields of the plan being stepped
        self._table: dict[type, Callable[[Any], Any]] = {
            fx.Enqueue: lambda e: self.journal.enqueue(e.records),
            fx.Flush: self._flush,
            fx.StoreBarrier: lambda e: self.notifier.stored(),
            fx.Rewrite: lambda e: self._write_snapshot(self.journal.rewrite),
            fx.Compact: lambda e: self._write_snapshot(self.journal.compact),
            fx.Inspect: self._inspect,
            fx.CloseFds: self._close_fds,
            fx.Hold: self._hold,
            fx.LetGo: self._let_go,
            fx.CloseReleased: self._close_released,
            fx.FollowUndo: self._follow_undo,
            fx.Unheld: lambda e: tuple(key for key in e.keys if key not in self.vault),
            fx.Dup: self._dup,
            fx.Release: lambda e: self.vault.release(e.key),
            fx.ReleaseSpares: lambda e: self.vault.release_spares(e.session),
            fx.Sizes: self._sizes,
            fx.TakeCarried: self._take_carried,
            fx.Restore: self._restore,
            fx.Claim: self._claim,
            fx.RestoreAhead: self._restore_ahead,
            fx.SettleRestores: lambda e: self.restores.settle(e.session),
            fx.RebootCounts: lambda e: asyncio.to_thread(self.backend.reboot_counts),
            fx.BootFacts: lambda e: (boot_id(), pid1_start()),
            fx.PrepareHandover: lambda e: asyncio.to_thread(
                self.backend.prepare_handover, *self._held()),
            fx.WriteHandover: self._write_handover,
            fx.DiscardHandover: lambda e: _refusing(
                asyncio.to_thread(self.backend.discard_handover)),
            fx.BackendFinishSession: lambda e: asyncio.to_thread(
                self.backend.finish_session, e.session, e.released),
            fx.BackendFinish: lambda e: asyncio.to_thread(self.backend.finish),
            fx.Deadline: lambda e: asyncio.get_running_loop().time() + e.seconds,
            fx.WaitChange: self._wait_change,
            fx.Announce: self._announce_records,
            fx.FreezeStarted: lambda e: self.listeners.freeze_started(),
            fx.RebootNotFollowed: lambda e: self.listeners.reboot_failed(e.reason),
            fx.Notify: lambda e: self.notifier.notify(*e.fields),
            fx.Log: lambda e: getattr(log, e.level)(e.event, **{**self._context, **e.fields}),
            fx.LogRestored: self._log_restored,
            fx.WriteRestoredLog: lambda e: self._write_restored_log(),
        }

    # ---- running plans -------------------------------------------------------------

    def start(self, plan: Plan[T], context: dict[str, Any] | None = None) -> Running[T]:
        """The plan's effects up to the first that takes an await (or its end); `context`:
        log fields for its effects, where the caller's task has none bound."""
        running = Running(plan, context)
        self._step(running, None, None)
        return running

    async def run(self, plan: Plan[T]) -> T:
        running = self.start(plan)
        while running.pending is not None:
            try:
                outcome, failure = await self._perform(running.pending)
            except asyncio.CancelledError as cancelled:  # the plan's own cleanup runs
                self._step(running, None, cancelled)
                raise
            self._step(running, outcome, failure)
        return running.result()

    def run_now(self, plan: Plan[T]) -> T:
        """A plan that takes no await (a departed client's drop)."""
        running = self.start(plan)
        if running.pending is not None:
            raise RuntimeError(f"{running.pending!r} needs an await")  # a plan's bug
        return running.result()

    async def run_together(self, started: Sequence[Running[Any]]) -> None:
        """Plans started one after the other, carried on together: those waiting at the
        same time on an effect of a SHARED type (a flush, a rewrite) share one. Cancelled,
        each keeps the effect it waits on, to be carried out again."""
        while waiting := [r for r in started if r.pending is not None]:
            shared: dict[type, list[Running[Any]]] = {}  # SHARED effects have no fields
            alone: list[list[Running[Any]]] = []
            for running in waiting:
                if type(running.pending) in fx.SHARED:
                    shared.setdefault(type(running.pending), []).append(running)
                else:
                    alone.append([running])
            groups = [*shared.values(), *alone]
            outcomes = await asyncio.gather(
                *[self._perform(group[0].pending) for group in groups])  # type: ignore[arg-type]
            for group, (outcome, failure) in zip(groups, outcomes, strict=True):
                for running in group:
                    self._step(running, outcome, failure)

    def _step(self, running: Running[Any], outcome: Any, failure: BaseException | None) -> None:
        """Send the outcome in; carry out every effect that takes no await, until one does
        or the plan ends. Log lines of its effects carry the plan's own log fields."""
        self._context = running.context
        try:
            self._steps(running, outcome, failure)
        finally:
            self._context = {}

    def _steps(self, running: Running[Any], outcome: Any, failure: BaseException | None) -> None:
        running.pending, value, error = commands.advance(
            running.plan, outcome, failure, self._carry_out)
        if running.pending is None:
            running.value, running.error = value, error
            self.changed.set()

    def _carry_out(self, effect: fx.Effect) -> Any:
        return self._table[type(effect)](effect)

    async def _perform(self, effect: fx.Effect) -> tuple[Any, BaseException | None]:
        try:
            return await self._table[type(effect)](effect), None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return None, exc

    # ---- the contract's operations, as the bus edge calls them -------------------------

    async def flush(self) -> None:
        await self.run(commands.flush(self.core))

    async def create_session(self, caller: Caller, name: str) -> str:
        return await self.run(commands.create_session(self.core, caller, name))

    def retrieve_session(self, caller: Caller, name: str) -> Session:
        return self.run_now(commands.retrieve_session(self.core, caller, name))

    async def preserve_fd(
        self, caller: Caller, session: str, token: str, fd: int, requires: Sequence[str]
    ) -> None:
        """Takes ownership of `fd`: it is kept, or closed on every failure path."""
        await self.preserve_fds(caller, session, [(token, fd, requires)], "PreserveFd")

    async def preserve_fds(
        self, caller: Caller, session: str, fds: Sequence[tuple[str, int, Sequence[str]]],
        command: str,
    ) -> None:
        await self.run(commands.preserve_fds(self.core, caller, session, fds, command))

    async def unpreserve_fd(self, caller: Caller, session: str, token: str) -> None:
        await self.run(commands.unpreserve_fd(self.core, caller, session, token))

    async def retrieve_fd(self, caller: Caller, session: str, token: str) -> int:
        """A new fd for the caller (a dup of the one held); the caller must close it."""
        (fd,) = await self.retrieve_fds(caller, session, [token], "RetrieveFd")
        return fd

    async def retrieve_fds(
        self, caller: Caller, session: str, tokens: Sequence[str], command: str
    ) -> list[int]:
        return await self.run(commands.retrieve_fds(
            self.core, caller, session, tokens, command,
            carried_in_store=self.backend.keeps_fd_store))

    async def delay_freeze(self, caller: Caller, session: str, enable: bool) -> None:
        await self.run(commands.delay_freeze(self.core, caller, session, enable))

    async def ready_for_freeze(self, caller: Caller, session: str) -> None:
        await self.run(commands.ready_for_freeze(self.core, caller, session))

    async def finish_session(self, caller: Caller, session: str) -> None:
        await self.run(commands.finish_session(self.core, caller, session))

    async def close_session(self, caller: Caller, session: str) -> None:
        await self.run(commands.close_session(self.core, caller, session))

    def client_left(self, client: str) -> None:
        self.run_now(commands.client_left(self.core, client))

    def drop_departed_elsewhere(self) -> None:
        self.run_now(commands.departed_elsewhere(self.core))

    async def drop_session(self, caller: Caller, session: str, reason: str) -> None:
        await self.run(commands.drop_session(self.core, caller, session, reason))

    def retrieve_quarantined(self, caller: Caller, qid: str) -> int:
        return self.run_now(commands.retrieve_quarantined(self.core, caller, qid))

    async def release_quarantined(self, caller: Caller, qid: str) -> None:
        await self.run(commands.release_quarantined(self.core, caller, qid))

    async def prepare(self, caller: Caller) -> None:
        await self.run(commands.prepare(self.core, caller))

    async def freeze(self, caller: Caller) -> None:
        await self.run(commands.freeze(self.core, caller, self.freeze_timeout))

    async def cancel(self, caller: Caller) -> None:
        await self.run(commands.cancel(self.core, caller))

    async def reboot(self, caller: Caller) -> int:
        return await self.run(commands.reboot(self.core, caller))

    async def reboot_did_not_follow(self, reason: str) -> None:
        await self.run(commands.reboot_did_not_follow(self.core, reason))

    async def finish(self, caller: Caller) -> None:
        await self.run(commands.finish(self.core, caller))

    # ---- the effects: the journal ----------------------------------------------------

    async def _flush(self, effect: fx.Flush) -> None:
        """The journal's group commit, then systemd's barrier on the fds sent to its
        store; past its bound, a compaction in the background keeps replay, on the
        blackout path, proportional to what is held."""
        through = self.core.serial  # every decision so far is enqueued (in its step)
        try:
            await self.journal.flush()
        except OSError as exc:
            raise fx.Refused(describe(exc)) from exc
        self.core.durable_through(through)  # at once: no later refusal may take it back
        await self.notifier.stored()
        if self._compaction is None and self.journal.needs_compaction():
            self._compaction = asyncio.ensure_future(self._compact())

    async def _compact(self) -> None:
        try:
            if await self.run(commands.compact(self.core)):
                log.info("journal_compacted", bytes=self.journal.size)
        finally:
            self._compaction = None

    async def _write_snapshot(
        self, write: Callable[[Callable[[], list[Record]]], Awaitable[None]]
    ) -> int:
        """Rewrite or compact the journal to the core's state; the serial it covered."""
        covered = 0

        def snapshot() -> list[Record]:
            nonlocal covered
            covered = self.core.serial
            return self.core.snapshot()

        await _refusing(write(snapshot))
        return covered

    # ---- the effects: held fds -------------------------------------------------------

    def _inspect(self, effect: fx.Inspect) -> tuple[FdFacts, ...]:
        """The memfd's facts; an error about one fd of several says which token it is for."""
        facts: list[FdFacts] = []
        for token, fd in effect.fds:
            try:
                facts.append(memfd.inspect(fd))
            except UnsupportedFd as exc:
                if len(effect.fds) > 1:
                    raise UnsupportedFd(f"fd of token {token!r}: {exc}") from None
                raise
        return tuple(facts)

    def _close_fds(self, effect: fx.CloseFds) -> None:
        for fd in effect.fds:
            os.close(fd)

    def _hold(self, effect: fx.Hold) -> None:
        for key, fd in effect.fds:
            self.vault.keep(key, fd)

    def _let_go(self, effect: fx.LetGo) -> None:
        """A release the journal may still refuse keeps the fd, and a restore of it under
        way (a kernel's retrieve is done once), until it is durable."""
        for record in effect.records:
            if isinstance(record, FdReleased):
                key = (record.session, record.token)
                if not effect.undoable:
                    self.restores.drop(key)
                    self.vault.release(key)
                    continue
                self._releasing.append((effect.serial, key, self.vault.take(key)))

    def _close_released(self, effect: fx.CloseReleased) -> None:
        while self._releasing and self._releasing[0][0] <= effect.serial:
            _, key, fd = self._releasing.popleft()
            self.restores.drop(key)
            if fd is not None:
                os.close(fd)

    def _follow_undo(self, effect: fx.FollowUndo) -> None:
        for change, key in effect.changes:
            if change == "unpreserved":
                self.restores.drop(key)
                self.vault.release(key)
                continue
            kept = [item for item in self._releasing if item[1] == key]
            if kept:
                self._releasing.remove(kept[-1])
                if kept[-1][2] is not None:
                    self.vault.keep(key, kept[-1][2])

    def _dup(self, effect: fx.Dup) -> list[int]:
        fds: list[int] = []
        try:
            for key in effect.keys:
                fds.append(self.vault.dup(key))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _held(self) -> tuple[dict[Key, int], dict[Key, FdEntry]]:
        entries = {
            (name, token): entry
            for name, session in self.core.sessions.items()
            for token, entry in session.fds.items()
        }
        fds = {key: fd for key, fd in self.vault.items().items() if key in entries}
        return fds, entries

    def _sizes(self, effect: fx.Sizes) -> dict[Key, int]:
        return {key: os.fstat(fd).st_size for key, fd in self._held()[0].items()}

    # ---- the effects: restores -------------------------------------------------------

    def _take_carried(
        self, effect: fx.TakeCarried
    ) -> tuple[dict[Key, tuple[int, int]], Exception | None]:
        """A dup of the backend's is kept, not stored again (systemd would only compare
        it with every fd of the store to drop it)."""
        kept: dict[Key, tuple[int, int]] = {}
        for key, entry in effect.entries:
            if key in self.vault:  # the same token twice in one call
                continue
            try:
                fd = self.backend.retrieve_fd(key, entry)
            except Exception as exc:
                return kept, exc
            self.vault.keep(key, fd, store=False)
            st = os.fstat(fd)
            kept[key] = (st.st_dev, st.st_ino)
        return kept, None

    async def _restore(self, effect: fx.Restore) -> None:
        # wanted() is called before the first await: in the step that allowed it.
        waits = [self.restores.wanted(key, entry) for key, entry in effect.entries]
        for outcome in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    def _claim(self, effect: fx.Claim) -> dict[Key, tuple[int, int] | None]:
        kept: dict[Key, tuple[int, int] | None] = {}
        for key in effect.keys:
            fd = self.restores.claim(key)
            if fd is None or key in self.vault:  # a concurrent RetrieveFd kept it first
                if fd is not None:
                    os.close(fd)
                if key in self.vault:
                    kept[key] = None
                continue
            self.vault.keep(key, fd)
            st = os.fstat(fd)
            kept[key] = (st.st_dev, st.st_ino)
        return kept

    def _restore_ahead(self, effect: fx.RestoreAhead) -> None:
        """Only where the backend says it is worth it (the kernel's retrieve is cheap)."""
        if self.backend.restores_ahead:
            self.restores.ahead(effect.entries)

    def _log_restored(self, effect: fx.LogRestored) -> None:
        """One `fds_restored` line per session for the fds restored for callers within
        STATUS_INTERVAL: after the reboot every VMM asks at once, one call in flight
        each, and a line a call would cost a quarter of the call."""
        if not self._restored_log:
            asyncio.get_running_loop().call_later(
                STATUS_INTERVAL, self._write_restored_log, context=contextvars.Context())
        self._restored_log.setdefault(effect.session, {}).update(effect.restored)

    def _write_restored_log(self) -> None:
        for session, restored in self._restored_log.items():
            log.info("fds_restored", session=session, tokens=list(restored),
                     bytes=sum(restored.values()))
        self._restored_log.clear()

    # ---- the effects: the backend's handover -----------------------------------------

    async def _write_handover(self, effect: fx.WriteHandover) -> int:
        fds, entries = self._held()
        return await _refusing(asyncio.to_thread(
            self.backend.write_handover, fds, entries, boot_id(), self._report_progress))

    def _report_progress(self, carried: int) -> None:
        """From the writer thread: keep systemd's start/stop timeout from firing."""
        now = time.monotonic()
        if now - self._last_progress >= 1.0:
            self._last_progress = now
            self.notifier.notify(commands.HANDOVER_TIMEOUT_EXTENSION,
                                 f"STATUS=writing handover: {carried >> 20} MiB")

    # ---- the effects: waits and listeners --------------------------------------------

    async def _wait_change(self, effect: fx.WaitChange) -> bool:
        self.changed.clear()
        if effect.deadline is None:
            await self.changed.wait()
            return True
        remaining = effect.deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                await self.changed.wait()
        except TimeoutError:
            return False
        return True

    def _announce_records(self, effect: fx.Announce) -> None:
        """Who hears of durable records: signals, properties, STATUS=, the log."""
        changed: dict[str, None] = {}
        bound: tuple[tuple[str, Any], ...] | None = None  # the caller's log fields
        for record in effect.records:
            match record:
                case SessionCreated():
                    live = self.core.sessions.get(record.session)
                    # Not one dropped behind it, nor another of the same name since.
                    if live is not None and (live.client, live.bus) == (record.client,
                                                                        record.bus):
                        self.listeners.session_added(live)
                    log.info("session_created", session=record.session, uid=record.uid,
                             unit=record.unit)
                case FdPreserved():
                    changed[record.session] = None
                    if bound is None:  # the plan's log fields, or those its task bound
                        fields = self._context or structlog.contextvars.get_contextvars()
                        bound = tuple(fields.items())
                    self._preserved.setdefault((record.session, bound), []).append(record)
                case FdReleased():
                    changed[record.session] = None
                    log.info("fd_released", session=record.session, token=record.token,
                             reason=record.reason)
                case SessionDropped():
                    changed.pop(record.session, None)
                    self.listeners.session_removed(record.session)
                    log.info("session_dropped", session=record.session, reason=record.reason)
                case PhaseChanged():
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
        self.changed.set()  # a dropped laggard, a ready session, a phase: Freeze looks again
        if not self._changed:
            asyncio.get_running_loop().call_soon(self._announce)
        self._changed.update(changed)
        self._changed.setdefault("", None)

    def _announce(self) -> None:
        """PropertiesChanged, STATUS= and the `fds_preserved` lines once per turn of the
        loop, not once per call: the PreserveFd calls one group commit completes share
        them (a line each would cost more than the rest of the call)."""
        for name in self._changed:
            if name in self.core.sessions:
                self.listeners.session_changed(self.core.sessions[name])
        self._changed.clear()
        for (session, bound), preserved in self._preserved.items():
            log.info("fds_preserved", **dict(bound), session=session,
                     tokens=[r.token for r in preserved],
                     bytes=sum(r.size for r in preserved),
                     requires={r.token: r.requires for r in preserved if r.requires})
        self._preserved.clear()
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


async def _refusing(work: Awaitable[T]) -> T:
    """An OSError of the disk or the backend, as the outcome the plans read: Refused."""
    try:
        return await work
    except OSError as exc:
        raise fx.Refused(describe(exc)) from exc
