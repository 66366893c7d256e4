"""The core as a state machine whose journal may refuse any batch of decisions.

Rules are commands from several clients and the host, pipelined (decided before the
journal answers), then the journal's answer: durable, or refused. Invariants: after a
refusal the state is exactly the state of the last durable point (a refused command,
and every command decided on it, changes nothing); after success the durable records
replay to the live state. A core that applies a decision with no undo (as 0.3.0's did,
before the journal answered) is caught.
"""

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from liveupdated.core.errors import LiveUpdateError
from liveupdated.core.orchestrator import Caller, FdFacts, Limits, Orchestrator
from liveupdated.core.records import Record

ROOT = Caller(uid=0, unit="", client=":1.1", admin=True)
ALICE = Caller(uid=1000, unit="vmm@a.service", client=":1.2", admin=False)
CALLERS = {"root": ROOT, "alice": ALICE}
SESSIONS = ["vm-a", "vm-b", "1000-vm", "1000-vm-b"]
TOKENS = ["ram", "state", "nvram"]


def _replay(records: list[Record]) -> Orchestrator:
    core = Orchestrator(Limits(max_fds_per_session=3), clock_usec=lambda: 1)
    for record in records:
        core.apply(record)
    return core


class Undoable(RuleBasedStateMachine):
    make_core: Callable[[], Orchestrator] = staticmethod(
        lambda: Orchestrator(Limits(max_fds_per_session=3), clock_usec=lambda: 1))

    def __init__(self) -> None:
        super().__init__()
        self.core = self.make_core()
        self.durable: list[Record] = []  # what the journal holds
        self.pending: list[Record] = []  # decided, not yet answered
        self.at_durable = self.core.snapshot()
        self.ino = 0

    def _decide(self, decision: Callable[[], list[Record]]) -> None:
        with contextlib.suppress(LiveUpdateError):  # refused by a rule: nothing to journal
            self.pending += decision()

    @rule(who=st.sampled_from(sorted(CALLERS)), name=st.sampled_from(SESSIONS))
    def create_session(self, who: str, name: str) -> None:
        self._decide(lambda: self.core.create_session(CALLERS[who], name))

    @rule(who=st.sampled_from(sorted(CALLERS)), name=st.sampled_from(SESSIONS),
          token=st.sampled_from(TOKENS), size=st.sampled_from([0, 4096, 1 << 20]))
    def preserve_fd(self, who: str, name: str, token: str, size: int) -> None:
        self.ino += 1
        facts = FdFacts("memfd", size, token, 0, 1, self.ino)
        self._decide(lambda: self.core.preserve_fd(CALLERS[who], name, token, (), facts))

    @rule(who=st.sampled_from(sorted(CALLERS)), name=st.sampled_from(SESSIONS),
          token=st.sampled_from(TOKENS))
    def unpreserve_fd(self, who: str, name: str, token: str) -> None:
        self._decide(lambda: self.core.unpreserve_fd(CALLERS[who], name, token))

    @rule(who=st.sampled_from(sorted(CALLERS)), name=st.sampled_from(SESSIONS),
          enable=st.booleans())
    def delay_freeze(self, who: str, name: str, enable: bool) -> None:
        self._decide(lambda: self.core.delay_freeze(CALLERS[who], name, enable))

    @rule(who=st.sampled_from(sorted(CALLERS)), name=st.sampled_from(SESSIONS))
    def close(self, who: str, name: str) -> None:
        self._decide(lambda: self.core.close_session(CALLERS[who], name))

    @rule(name=st.sampled_from(SESSIONS))
    def drop_session(self, name: str) -> None:
        self._decide(lambda: self.core.drop_session(ROOT, name, "test"))

    @rule()
    def prepare(self) -> None:
        def prepare() -> list[Record]:
            records = self.core.prepare(ROOT)
            self.core.done("Prepare")
            return records
        self._decide(prepare)

    @rule()
    def freeze(self) -> None:
        def freeze() -> list[Record]:
            attempt = self.core.begin_freeze(ROOT)
            try:
                return self.core.freeze(ROOT, {}, attempt)
            finally:
                self.core.done("Freeze", attempt)
        self._decide(freeze)

    @rule()
    def journal_answers(self) -> None:
        self.durable += self.pending
        self.pending = []
        self.core.durable_through(self.core.serial)
        self.at_durable = self.core.snapshot()

    @rule()
    def journal_refuses(self) -> None:
        self.core.roll_back()
        self.pending = []
        assert self.core.snapshot() == self.at_durable, "a refused decision changed state"

    @invariant()
    def the_durable_records_and_the_pending_ones_replay_to_the_state(self) -> None:
        assert _replay(self.durable + self.pending).snapshot() == self.core.snapshot()

    @invariant()
    def counts_are_those_of_the_sessions(self) -> None:
        fds = sum(len(s.fds) for s in self.core.sessions.values())
        assert self.core.fd_count() == fds
        assert self.core.total_preserved_bytes() == sum(
            e.size for s in self.core.sessions.values() for e in s.fds.values())


SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def test_a_refused_batch_changes_nothing() -> None:
    run_state_machine_as_test(Undoable, settings=SETTINGS)


class NoUndo(Orchestrator):
    """0.3.0's core: decisions applied at once, nothing kept to take them back."""

    def __init__(self) -> None:
        super().__init__(Limits(max_fds_per_session=3), clock_usec=lambda: 1)
        self._revertible = False


class Mutant(Undoable):
    make_core = staticmethod(NoUndo)


def test_the_machine_catches_a_core_that_cannot_undo() -> None:
    with pytest.raises(AssertionError, match="a refused decision changed state"):
        run_state_machine_as_test(Mutant, settings=settings(
            SETTINGS, max_examples=300, database=None))
