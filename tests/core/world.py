"""The daemon's surroundings as a command's plan sees them, in memory: a helper of the
plan tests (tests/core/test_plan_*.py); it holds no tests itself.

It answers each effect of core/effects.py as the service would, on plain values: a
journal that may refuse a flush and then refuses every write until it is rewritten (as
journal.py does), fds as numbers with a size, a backend that may refuse, a barrier
that may time out. A test chooses, effect by effect, whether it succeeds.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from liveupdated.core import effects as fx
from liveupdated.core.commands import Plan, advance
from liveupdated.core.orchestrator import FdFacts, Orchestrator
from liveupdated.core.records import FdReleased, Record
from liveupdated.core.recovery import Key

ENOSPC = "No space left on device (ENOSPC)"

# The effects a world can refuse, and what it answers then.
FAILURES: dict[type[fx.Effect], Callable[[], BaseException]] = {
    fx.Flush: lambda: fx.Refused(ENOSPC),
    fx.Rewrite: lambda: fx.Refused(ENOSPC),
    fx.Compact: lambda: fx.Refused(ENOSPC),
    fx.PrepareHandover: lambda: RuntimeError("the backend refused its brownout work"),
    fx.WriteHandover: lambda: fx.Refused(ENOSPC),
    fx.DiscardHandover: lambda: fx.Refused(ENOSPC),
}


# Plans whose decisions stand whatever the journal says (core.unconditional()).
UNCONDITIONAL = frozenset({"cancel", "unconditional", "reboot_did_not_follow", "reboot",
                           "retrieve_fd"})  # a restore stands, journaled or not


@dataclass
class Running:
    """A plan under way in the world, with the effect it waits on."""

    name: str
    plan: Plan[Any]
    pending: fx.Effect | None = None
    value: Any = None
    error: BaseException | None = None
    owned: tuple[int, ...] = ()  # fds handed over with the call, not yet held or closed
    flush_covers: int = 0  # how many of the enqueued records its pending Flush covers

    @property
    def ended(self) -> bool:
        return self.pending is None


@dataclass
class World:
    core: Orchestrator
    durable: list[Record] = field(default_factory=list)  # what a restart replays
    enqueued: list[Record] = field(default_factory=list)
    enqueued_by: list[str] = field(default_factory=list)  # the plan of each, by name
    lost_unconditional: bool = False  # a refused flush dropped a decision that stands
    current: str = ""  # the plan whose effects are being answered
    written: int = 0  # records ever taken off `enqueued` (written, or dropped)
    _unconditional_next: bool = False
    journal_failed: bool = False  # refuses every write until rewritten
    held: dict[Key, int] = field(default_factory=dict)
    releasing: list[tuple[int, Key, int | None]] = field(default_factory=list)
    sizes: dict[int, int] = field(default_factory=dict)  # the open fds, and their sizes
    handover: bool = False
    carried: dict[Key, int] = field(default_factory=dict)  # the handover: each fd's size
    changed: bool = False  # a WaitChange would wake
    _next_fd: int = 100

    def __post_init__(self) -> None:
        """What the core holds already is durable: a restart would replay it."""
        self.core.durable_through(self.core.serial)
        self.durable = self.core.snapshot()

    def new_fd(self, size: int) -> int:
        self._next_fd += 1
        self.sizes[self._next_fd] = size
        return self._next_fd

    def close(self, fd: int) -> None:
        del self.sizes[fd]  # a KeyError is a double close

    # ---- driving plans -----------------------------------------------------------------

    def start(self, name: str, plan: Plan[Any], owned: tuple[int, ...] = ()) -> Running:
        running = Running(name, plan, owned=owned)
        self._step(running, None, None)
        return running

    def perform(self, running: Running, fail: bool = False) -> None:
        """Carry out the effect `running` waits on (refused if `fail` and it can be), and
        every effect after it that takes no await."""
        effect = running.pending
        assert effect is not None
        if fail and type(effect) in FAILURES:
            self._step(running, None, self._refuse(effect))
            return
        try:
            if isinstance(effect, fx.Flush):
                self._flush(running.flush_covers)
                outcome, failure = None, None
            else:
                outcome, failure = self.answer(effect), None
        except Exception as exc:
            outcome, failure = None, exc
        self._step(running, outcome, failure)

    def _flush(self, covers: int) -> None:
        """Write the enqueued records up to number `covers` of all ever enqueued."""
        if self.journal_failed:
            raise fx.Refused(ENOSPC)
        count = max(0, covers - self.written)
        self.durable += self.enqueued[:count]
        self._drop_enqueued(count)

    def _drop_enqueued(self, count: int) -> None:
        del self.enqueued[:count], self.enqueued_by[:count]
        self.written += count

    def blocked(self, running: Running) -> bool:
        """Waiting for a change that has not come (a WaitChange with no deadline)."""
        pending = running.pending
        return isinstance(pending, fx.WaitChange) and pending.deadline is None and not (
            self.changed)

    def until(self, running: Running, kind: type) -> list[fx.Effect]:
        """Carry a plan on, every effect succeeding, until it waits on an effect of `kind`
        (or ends); the effects it waited on meanwhile, in order."""
        waited: list[fx.Effect] = []
        while running.pending is not None and not isinstance(running.pending, kind):
            waited.append(running.pending)
            self.perform(running)
        assert isinstance(running.pending, kind), (
            f"{running.name} ended before it waited on a {kind.__name__}: {running.error!r}")
        return waited

    def to_end(self, running: Running) -> list[fx.Effect]:
        """Carry a plan on to its end, every effect succeeding; the effects it waited on."""
        return self.until(running, type(None))

    def run(self, name: str, plan: Plan[Any], owned: tuple[int, ...] = ()) -> Running:
        """A plan from start to end (or until it waits on another), every effect
        succeeding."""
        running = self.start(name, plan, owned)
        while not running.ended and not self.blocked(running):
            self.perform(running)
        return running

    def _refuse(self, effect: fx.Effect) -> BaseException:
        if isinstance(effect, fx.Flush):
            self.journal_failed = True
            self.lost_unconditional |= any(name in UNCONDITIONAL for name in self.enqueued_by)
            self._drop_enqueued(len(self.enqueued))  # never written: dropped at the rewrite
        return FAILURES[type(effect)]()

    def _step(self, running: Running, outcome: Any, failure: BaseException | None) -> None:
        """As the service steps a plan (commands.advance), effects answered here."""
        self.current = running.name

        def carry_out(effect: fx.Effect) -> Any:
            if isinstance(effect, fx.Hold | fx.CloseFds):
                running.owned = ()  # the plan's fds are held or closed from now on
            return self.answer(effect)

        running.pending, running.value, running.error = advance(
            running.plan, outcome, failure, carry_out)
        if running.pending is None:
            running.owned = ()
            self.changed = True
        else:  # a flush covers what was enqueued when it was called (journal.py)
            running.flush_covers = self.written + len(self.enqueued)

    # ---- the effects, as the service carries them out ---------------------------------

    def answer(self, effect: fx.Effect) -> Any:  # noqa: PLR0915 (a case an effect)
        match effect:
            case fx.Enqueue():
                self.enqueued += effect.records
                by = "unconditional" if self._unconditional_next else self.current
                self.enqueued_by += [by] * len(effect.records)
                self._unconditional_next = False
            case fx.Flush():
                self._flush(self.written + len(self.enqueued))
            case fx.Rewrite() | fx.Compact():
                if isinstance(effect, fx.Compact) and self.journal_failed:
                    raise fx.Refused(ENOSPC)
                self.durable = self.core.snapshot()
                self._drop_enqueued(len(self.enqueued))
                self.journal_failed = False
                return self.core.serial
            case fx.StoreBarrier() | fx.Announce() | fx.Log() | fx.Notify() | fx.FreezeStarted():
                self.changed = self.changed or isinstance(effect, fx.Announce)
            case fx.Inspect():
                return tuple(FdFacts("memfd", self.sizes[fd], token, 0, 1, fd)
                             for token, fd in effect.fds)
            case fx.CloseFds():
                for fd in effect.fds:
                    self.close(fd)
            case fx.Hold():
                for key, fd in effect.fds:
                    assert key not in self.held, f"{key} held twice"
                    self.held[key] = fd
            case fx.LetGo():
                self._unconditional_next = not effect.undoable  # its Enqueue follows
                for record in effect.records:
                    if isinstance(record, FdReleased):
                        key = (record.session, record.token)
                        if effect.undoable:  # held (if it is) until the release is durable
                            self.releasing.append((effect.serial, key, self.held.pop(key, None)))
                        elif key in self.held:
                            self.close(self.held.pop(key))
            case fx.CloseReleased():
                for item in [i for i in self.releasing if i[0] <= effect.serial]:
                    self.releasing.remove(item)
                    if item[2] is not None:
                        self.close(item[2])
            case fx.FollowUndo():
                for change, key in effect.changes:
                    if change == "unpreserved":
                        self.close(self.held.pop(key))
                    else:
                        item = [i for i in self.releasing if i[1] == key][-1]
                        self.releasing.remove(item)
                        if item[2] is not None:
                            self.held[key] = item[2]
            case fx.Unheld():
                return tuple(key for key in effect.keys if key not in self.held)
            case fx.Dup():
                return [self.new_fd(self.sizes[self.held[key]]) for key in effect.keys]
            case fx.Release():
                self.close(self.held.pop(effect.key))
            case fx.Sizes():
                return {key: self.sizes[fd] for key, fd in self.held.items()}
            case fx.Deadline():
                return 0.0
            case fx.WaitChange():
                woke, self.changed = self.changed, False
                return woke
            case fx.RebootCounts():
                return None
            case fx.BootFacts():
                return ("old-boot", 1)
            case fx.PrepareHandover():
                pass
            case fx.WriteHandover():
                self.handover = True
                self.carried = {key: self.sizes[fd] for key, fd in self.held.items()}
                return sum(self.carried.values())
            case fx.DiscardHandover():
                self.handover, self.carried = False, {}
            case fx.TakeCarried() | fx.Claim():
                keys = [key for key, _ in effect.entries] if isinstance(
                    effect, fx.TakeCarried) else list(effect.keys)
                kept: dict[Key, tuple[int, int] | None] = {}
                for key in keys:
                    if key in self.held:
                        kept[key] = None
                    elif key in self.carried:
                        self.held[key] = self.new_fd(self.carried[key])
                        kept[key] = (1, self.held[key])
                if isinstance(effect, fx.TakeCarried):
                    return {key: ident for key, ident in kept.items() if ident is not None}, None
                return kept
            case fx.BackendFinish():
                self.handover, self.carried = False, {}
            case fx.BackendFinishSession():
                self.carried = {k: v for k, v in self.carried.items() if k[0] != effect.session}
            case (fx.ReleaseSpares() | fx.SettleRestores() | fx.WriteRestoredLog()
                  | fx.RestoreAhead() | fx.LogRestored() | fx.RebootNotFollowed()
                  | fx.Restore()):
                pass
            case _:
                raise AssertionError(f"no answer for {effect!r} in this world")
        return None
