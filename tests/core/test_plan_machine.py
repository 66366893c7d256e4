"""Every command's whole life, under every failure, pipelined: a model test of the plans.

Commands from two tenants and the host start and wait on their effects together (as
pipelined calls do); the test picks which waiting plan goes on next and whether its
effect succeeds or is refused (a journal flush or rewrite, the backend's brownout work,
the handover, its discard), and clients leave mid-call. After every step:

- the fds held are exactly those of the core's entries, and no fd is leaked;
- what the journal holds (durable and enqueued) replays to the core's state: a refused
  flush took back every decision it refused, and the held fds followed;
- a command that succeeded is durable: what its reply says is in what a restart
  replays, unless a command started after it changed that since;
- a command refused by a rule changed nothing at all.

A mutant shows it can fail: a `flush` that answers before the journal does. (One that
does not ask whether its decision was taken back while it waited needs a sequence too
particular for a random walk: tests/core/test_plans.py builds it.)
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from liveupdated.core import commands
from liveupdated.core import effects as fx
from liveupdated.core.commands import Plan
from liveupdated.core.errors import Storage
from liveupdated.core.orchestrator import Caller, Limits, Orchestrator, Phase
from liveupdated.core.records import Record
from tests.core.world import Running, World

ROOT = Caller(uid=0, unit="", client=":1.1", admin=True)
TENANTS = {
    "alice": Caller(uid=1000, unit="", client=":1.2", admin=False),
    "bob": Caller(uid=1001, unit="", client=":1.3", admin=False),
}
SESSIONS = {"alice": ["1000-a", "1000-b"], "bob": ["1001-a"]}
RARELY = st.integers(0, 9).map(lambda n: n == 0)  # an effect refused one time in ten
TOKENS = ["ram", "vram"]


def _replay(records: list[Record]) -> Orchestrator:
    core = Orchestrator(Limits(max_fds_per_session=2), clock_usec=lambda: 1)
    for record in records:
        core.apply(record)
    return core


def _fds(core: Orchestrator) -> set[tuple[str, str]]:
    return {(name, token) for name, s in core.sessions.items() for token in s.fds}


class Plans(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = Orchestrator(Limits(max_fds_per_session=2), clock_usec=lambda: 1)
        self.world = World(self.core)
        self.waiting: list[Running] = []
        # Started plans in order: what each touches (session names, or "host").
        self.started: list[frozenset[str]] = []
        self.checks: dict[int, tuple[int, Callable[[Orchestrator], bool], str]] = {}

    @initialize()
    def each_tenant_holds_a_session(self) -> None:
        for who in sorted(TENANTS):
            name = SESSIONS[who][0]
            assert self.world.run("create", commands.create_session(
                self.core, TENANTS[who], name)).error is None
            fd = self.world.new_fd(4096)
            assert self.world.run("preserve", commands.preserve_fds(
                self.core, TENANTS[who], name, [("ram", fd, ())], "PreserveFd"),
                owned=(fd,)).error is None

    @rule()
    def the_host_updates(self) -> None:
        """Prepare, Freeze, Reboot and the kexec, each run to its end: the way to updated."""
        for name, plan in (("prepare", commands.prepare), ("freeze", None),
                           ("reboot", commands.reboot)):
            made = (commands.freeze(self.core, ROOT, 1.0) if plan is None
                    else plan(self.core, ROOT))
            self.started.append(frozenset({"host"}))
            running = self.world.run(name, made)
            if not running.ended:  # it waits on another: carried on by other rules
                self.waiting.append(running)
                return
            if running.error is not None:
                return
        self.kexec()

    # ---- starting commands -------------------------------------------------------------

    def _start(self, name: str, target: str | frozenset[str], plan: Plan[Any],
               owned: tuple[int, ...] = (),
               holds: Callable[[Orchestrator], bool] | None = None) -> None:
        before = (self.core.snapshot(), _fds(self.core), self.core.in_flight)
        self.started.append(frozenset([target]) if isinstance(target, str) else target)
        running = self.world.start(name, plan, owned)
        if holds is not None:
            self.checks[id(running)] = (len(self.started), holds, f"{name} on {target}")
        if running.ended and running.error is not None and not isinstance(
                running.error, Storage):
            after = (self.core.snapshot(), _fds(self.core), self.core.in_flight)
            assert after == before, f"{name} refused by a rule changed the state"
        self._settle(running)

    @rule(who=st.sampled_from(sorted(TENANTS)), data=st.data())
    def create_session(self, who: str, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(SESSIONS[who]))
        self._start("create_session", name,
                    commands.create_session(self.core, TENANTS[who], name),
                    holds=lambda core: name in core.sessions)

    @rule(who=st.sampled_from(sorted(TENANTS)), data=st.data(), token=st.sampled_from(TOKENS),
          size=st.sampled_from([0, 4096]))
    def preserve_fd(self, who: str, data: st.DataObject, token: str, size: int) -> None:
        name = data.draw(st.sampled_from(SESSIONS[who]))
        fd = self.world.new_fd(size)
        self._start("preserve_fd", name, commands.preserve_fds(
            self.core, TENANTS[who], name, [(token, fd, ())], "PreserveFd"), owned=(fd,),
            holds=lambda core: name in core.sessions and token in core.sessions[name].fds)

    @rule(who=st.sampled_from(sorted(TENANTS)), data=st.data(), token=st.sampled_from(TOKENS))
    def unpreserve_fd(self, who: str, data: st.DataObject, token: str) -> None:
        name = data.draw(st.sampled_from(SESSIONS[who]))
        self._start("unpreserve_fd", name,
                    commands.unpreserve_fd(self.core, TENANTS[who], name, token),
                    holds=lambda core: token not in getattr(core.sessions.get(name), "fds", {}))

    @rule(who=st.sampled_from(sorted(TENANTS)), data=st.data(), enable=st.booleans())
    def delay_freeze(self, who: str, data: st.DataObject, enable: bool) -> None:
        name = data.draw(st.sampled_from(SESSIONS[who]))
        self._start("delay_freeze", name,
                    commands.delay_freeze(self.core, TENANTS[who], name, enable))

    @rule(who=st.sampled_from(sorted(TENANTS)), data=st.data())
    def ready_for_freeze(self, who: str, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(SESSIONS[who]))
        self._start("ready_for_freeze", name,
                    commands.ready_for_freeze(self.core, TENANTS[who], name))

    @rule(who=st.sampled_from(sorted(TENANTS)), data=st.data())
    def close(self, who: str, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(SESSIONS[who]))
        self._start("close", name, commands.close_session(self.core, TENANTS[who], name),
                    holds=lambda core: name not in core.sessions)

    @rule(who=st.sampled_from(sorted(TENANTS)), data=st.data())
    def drop_session(self, who: str, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(SESSIONS[who]))
        self._start("drop_session", name,
                    commands.drop_session(self.core, ROOT, name, "test"),
                    holds=lambda core: name not in core.sessions)

    @rule(who=st.sampled_from(sorted(TENANTS)))
    def client_leaves(self, who: str) -> None:
        self._start("client_left", frozenset(SESSIONS[who]),
                    commands.client_left(self.core, TENANTS[who].client))

    @rule(who=st.sampled_from(sorted(TENANTS)), data=st.data(), token=st.sampled_from(TOKENS),
          carried_in_store=st.booleans())
    def retrieve_fd(self, who: str, data: st.DataObject, token: str,
                    carried_in_store: bool) -> None:
        name = data.draw(st.sampled_from(SESSIONS[who]))
        self._start("retrieve_fd", name, commands.retrieve_fds(
            self.core, TENANTS[who], name, [token], "RetrieveFd",
            carried_in_store=carried_in_store))

    @rule(who=st.sampled_from(sorted(TENANTS)), data=st.data())
    def finish_session(self, who: str, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(SESSIONS[who]))
        self._start("finish_session", name,
                    commands.finish_session(self.core, TENANTS[who], name),
                    holds=lambda core: name not in core.sessions or core.sessions[name].finished)

    @rule()
    def finish(self) -> None:
        self._start("finish", "host", commands.finish(self.core, ROOT),
                    holds=lambda core: core.phase is Phase.NORMAL)

    @rule()
    def kexec(self) -> None:
        """The reboot happens: the old daemon's calls die with it, the journal's durable
        records are all the next one has, the handover all it finds of the fds."""
        if (self.core.reboot is None or not self.world.handover
                or any(r.name == "reboot" for r in self.waiting)):
            return
        event("kexec")
        carried = self.world.carried
        self.core = _replay(self.world.durable)
        self.core.rebooted("new-boot")
        self.world = World(self.core, carried=carried, handover=True)
        self.waiting, self.checks = [], {}
        self.started.append(frozenset({"host", *self.core.sessions}))

    @rule()
    def prepare(self) -> None:
        self._start("prepare", "host", commands.prepare(self.core, ROOT),
                    holds=lambda core: core.phase is Phase.PREPARED)

    @rule()
    def freeze(self) -> None:
        self._start("freeze", "host", commands.freeze(self.core, ROOT, 1.0),
                    holds=lambda core: core.phase is Phase.FROZEN)

    @rule()
    def cancel(self) -> None:
        self._start("cancel", "host", commands.cancel(self.core, ROOT))

    @rule()
    def reboot(self) -> None:
        self._start("reboot", "host", commands.reboot(self.core, ROOT))

    @rule()
    def reboot_does_not_follow(self) -> None:
        if self.core.reboot is not None and self.core.in_flight == "":
            self._start("reboot_did_not_follow", "host",
                        commands.reboot_did_not_follow(self.core, "no reboot came"))

    # ---- effects carried out -------------------------------------------------------------

    @rule(data=st.data(), fail=st.booleans())
    def effect_done(self, data: st.DataObject, fail: bool) -> None:
        """One effect of one waiting plan, answered or refused."""
        movable = [r for r in self.waiting if not self.world.blocked(r)]
        if not movable:
            return
        running = data.draw(st.sampled_from(movable))
        self.world.perform(running, fail=fail)
        self._settle(running)

    @rule(data=st.data())
    def plan_runs_on(self, data: st.DataObject) -> None:
        """A waiting plan carried on to its end (or until it waits on another), each
        effect refused now and then."""
        movable = [r for r in self.waiting if not self.world.blocked(r)]
        if not movable:
            return
        running = data.draw(st.sampled_from(movable))
        while not running.ended and not self.world.blocked(running):
            self.world.perform(running, fail=data.draw(RARELY))
        self._settle(running)

    @rule(data=st.data())
    def everything_runs_on(self, data: st.DataObject) -> None:
        """Every waiting plan carried on, in turn, an effect at a time, until each has
        ended or waits on another."""
        while movable := [r for r in self.waiting if not self.world.blocked(r)]:
            running = movable[0]
            self.world.perform(running, fail=data.draw(RARELY))
            self._settle(running)

    def _settle(self, running: Running) -> None:
        if not running.ended:
            if running not in self.waiting:
                self.waiting.append(running)
            return
        if running in self.waiting:
            self.waiting.remove(running)
        if running.name == "retrieve_fd" and running.error is None:
            for fd in running.value:  # the caller's copies
                self.world.close(fd)
        check = self.checks.pop(id(running), None)
        if check is None or running.error is not None:
            return
        started_at, holds, what = check
        if any(self.started[started_at - 1] & later for later in self.started[started_at:]):
            return  # a command started after it touched the same: it may have changed it
        event(f"{what.split()[0]} succeeded in {self.core.phase.value}")
        assert holds(self.core), f"{what} succeeded, but the state says otherwise"
        assert holds(_replay(self.world.durable)), f"{what} succeeded but is not durable"

    # ---- after every step ----------------------------------------------------------------

    @invariant()
    def the_fds_held_are_the_cores(self) -> None:
        if self.core.phase is Phase.UPDATED:  # restored when asked for: fewer held
            assert set(self.world.held) <= _fds(self.core)
        else:
            assert set(self.world.held) == _fds(self.core)

    @invariant()
    def no_fd_is_leaked(self) -> None:
        accounted = set(self.world.held.values())
        accounted |= {fd for _, _, fd in self.world.releasing if fd is not None}
        accounted |= {fd for r in self.waiting for fd in r.owned}
        assert set(self.world.sizes) == accounted

    @invariant()
    def the_journal_replays_to_the_state(self) -> None:
        if self.world.lost_unconditional:
            return  # a Cancel or a departed client's drop stands unjournaled (documented)
        replayed = _replay(self.world.durable + self.world.enqueued)
        assert replayed.snapshot() == self.core.snapshot()


SETTINGS = settings(max_examples=200, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def test_every_command_under_every_failure_keeps_its_word() -> None:
    run_state_machine_as_test(Plans, settings=SETTINGS)


@contextmanager
def mutant(name: str, replacement: Callable[..., Plan[None]]) -> Iterator[None]:
    original = getattr(commands, name)
    setattr(commands, name, replacement)
    try:
        yield
    finally:
        setattr(commands, name, original)


def answers_before_the_journal(core: Orchestrator, decision: int | None = None) -> Plan[None]:
    """A flush that enqueues and answers at once: applied and acknowledged before the
    journal has answered."""
    core.durable_through(core.serial)
    yield fx.CloseReleased(core.serial)


def test_the_machine_catches_a_flush_that_answers_before_the_journal() -> None:
    with mutant("flush", answers_before_the_journal), pytest.raises(
            (AssertionError, ExceptionGroup)) as raised:
        run_state_machine_as_test(Plans, settings=settings(
            SETTINGS, max_examples=2000, database=None))
    found = (raised.value.exceptions if isinstance(raised.value, ExceptionGroup)
             else [raised.value])
    assert any("succeeded but is not durable" in str(e) for e in found), found
