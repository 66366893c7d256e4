"""The orchestrator core as a hypothesis state machine: rules are events, invariants are
the session rules of docs/DESIGN.md §2 (sessions, ownership, phases).

Every command is checked against a model: it fails exactly when the rules say so, with
one of the errors that apply, and a failed command changes nothing. Invariants: the
records returned so far replay to the live state (the journal), the snapshot replays to
it too (compaction), limits hold, no session has a dependency cycle, Freeze never let a
missing requirement through, and Cancel returns exactly to the state before Prepare.
"""

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from liveupdated.core.errors import LiveUpdateError
from liveupdated.core.orchestrator import Caller, FdFacts, Limits, Orchestrator, Phase
from liveupdated.core.records import CycleRecorded, Record, SessionCreated
from tests.conftest import closes_cycle

LIMITS = Limits(max_sessions=5, max_fds_per_session=3, max_sessions_per_uid=2,
                max_preserved_bytes=20000, max_fds_per_uid=4, max_bytes_per_uid=12000)
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
UIDS = {"root": 0, "alice": 1000, "alice-too": 1000, "bob": 1001}
# free names (an admin's), names with a non-admin's uid prefix, and with another's
SESSIONS = ["vm-a", "vm-b", "1000-vm-a", "1000-vm-b", "1000-vm-c", "1001-vm-a", "1001-vm-b",
            "0-vm"]
TOKENS = ["a", "b", "c", "d", "e"]

any_text = st.text(max_size=70)
actors = st.sampled_from(sorted(UIDS))
session_names = st.one_of(st.sampled_from(SESSIONS), st.sampled_from(SESSIONS), any_text)
tokens = st.one_of(st.sampled_from(TOKENS), st.sampled_from(TOKENS), st.sampled_from(TOKENS),
                   any_text)
requires_lists = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=3, unique=True),
    st.lists(tokens, max_size=3),
)
sizes = st.sampled_from([0, 1, 4096, 9000])


@dataclass
class ModelFd:
    requires: tuple[str, ...]
    size: int
    lost: bool = False
    restored: bool = False


@dataclass
class ModelSession:
    uid: int
    client: str
    fds: dict[str, ModelFd] = field(default_factory=dict)
    delay: bool = False
    ready: bool = False
    finished: bool = False
    prepared: bool = False  # through a Prepare: it outlives its client, even after Cancel


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = itertools.count(1_000_000, 1000)
        self.core = Orchestrator(LIMITS, clock_usec=lambda: next(self.clock))
        self.records: list[Record] = []
        self.phase = "normal"
        self.sessions: dict[str, ModelSession] = {}
        self.connections = itertools.count(1)
        self.clients = {actor: self._new_client() for actor in UIDS}
        self.before_prepare: list[Record] | None = None

    def _new_client(self) -> str:
        return f":1.{next(self.connections)}"

    def caller(self, actor: str) -> Caller:
        uid = UIDS[actor]
        return Caller(uid=uid, unit=f"vmm@{actor}.service" if uid else "",
                      client=self.clients[actor], admin=uid == 0)

    # ---- the check every command goes through -----------------------------------------

    def attempt(self, expected: set[str], command: Callable[[], list[Record]]) -> bool:
        """Run `command`; it must fail with one of `expected`, or succeed if that is empty.
        A failure must change nothing. True when it succeeded."""
        before = self.core.snapshot()
        try:
            records = command()
        except LiveUpdateError as exc:
            assert exc.name in expected, f"{exc.name}: {exc}; expected {expected or 'success'}"
            assert str(exc), f"{exc.name} without a message"
            assert self.core.snapshot() == before, f"{exc.name} changed the state"
            return False
        assert not expected, f"succeeded; expected one of {expected}"
        self.records += records
        return True

    def is_admin(self, actor: str) -> bool:
        return UIDS[actor] == 0

    def uid_usage(self, uid: int) -> tuple[int, int]:
        """(fds, bytes) the model's sessions of `uid` hold."""
        fds = [fd for s in self.sessions.values() if s.uid == uid for fd in s.fds.values()]
        return len(fds), sum(fd.size for fd in fds)

    def session_errors(self, actor: str, name: str, phases: set[str]) -> set[str]:
        session = self.sessions.get(name)
        if session is None:
            return {"NoSuchSession", "InvalidArgument"} if not NAME_RE.fullmatch(name) else {
                "NoSuchSession"
            }
        errors = set()
        if UIDS[actor] not in (0, session.uid):
            errors.add("AccessDenied")
        if self.phase not in phases:
            errors.add("WrongState")
        return errors

    def missing(self) -> list[str]:
        return [
            f"{n}/{r}" for n, s in sorted(self.sessions.items())
            for fd in s.fds.values() for r in fd.requires if r not in s.fds
        ] + [f"{n}/{t}" for n, s in self.sessions.items() for t, fd in s.fds.items() if fd.lost]

    # ---- session commands ---------------------------------------------------------------

    @rule(actor=actors, name=session_names)
    def create_session(self, actor: str, name: str) -> None:
        errors = set()
        if not NAME_RE.fullmatch(name):
            errors.add("InvalidArgument")
        if not self.is_admin(actor) and not name.startswith(f"{UIDS[actor]}-"):
            errors.add("InvalidArgument")  # a non-admin's names start with its uid
        if self.phase != "normal":
            errors.add("WrongState")
        if name in self.sessions:
            errors.add("SessionExists")
        owned = sum(1 for s in self.sessions.values() if s.uid == UIDS[actor])
        if len(self.sessions) >= LIMITS.max_sessions or (
            UIDS[actor] != 0 and owned >= LIMITS.max_sessions_per_uid
        ):
            errors.add("QuotaExceeded")
        if self.attempt(errors, lambda: self.core.create_session(self.caller(actor), name)):
            self.sessions[name] = ModelSession(UIDS[actor], self.clients[actor])
            assert self.core.sessions[name].unit == self.caller(actor).unit

    @rule(actor=actors, name=session_names,
          fds=st.lists(st.tuples(tokens, requires_lists, sizes), min_size=1, max_size=3))
    def preserve_fds(
        self, actor: str, name: str, fds: list[tuple[str, list[str], int]]
    ) -> None:
        """PreserveFd for one fd, PreserveFds for several: all of them or none."""
        errors = set()
        tokens = [token for token, _, _ in fds]
        if (
            not all(NAME_RE.fullmatch(t) for token, requires, _ in fds for t in [token, *requires])
            or any(len(set(requires)) != len(requires) for _, requires, _ in fds)
            or len(set(tokens)) != len(tokens)
        ):
            errors.add("InvalidArgument")
        errors |= self.session_errors(actor, name, {"normal"})
        session = self.sessions.get(name)
        if session is not None:
            if any(token in session.fds for token in tokens):
                errors.add("TokenExists")
            total = sum(fd.size for s in self.sessions.values() for fd in s.fds.values())
            adding = sum(size for _, _, size in fds)
            if len(session.fds) + len(fds) > LIMITS.max_fds_per_session or (
                total + adding > LIMITS.max_preserved_bytes
            ):
                errors.add("QuotaExceeded")
            held_fds, held_bytes = self.uid_usage(UIDS[actor])
            if not self.is_admin(actor) and (
                held_fds + len(fds) > LIMITS.max_fds_per_uid
                or held_bytes + adding > LIMITS.bytes_per_uid
            ):
                errors.add("QuotaExceeded")
            graph = {t: f.requires for t, f in session.fds.items()}
            graph.update((token, tuple(requires)) for token, requires, _ in fds)
            if any(closes_cycle(graph, token, requires) for token, requires, _ in fds):
                errors.add("InvalidArgument")
        caller = self.caller(actor)
        facts = [(t, r, FdFacts(kind="memfd", size=size, name="ram", seals=0))
                 for t, r, size in fds]
        if self.attempt(errors, lambda: self.core.preserve_fds(
            caller, name, facts, "PreserveFd" if len(fds) == 1 else "PreserveFds"
        )):
            assert session is not None
            for token, requires, size in fds:
                session.fds[token] = ModelFd(tuple(requires), size)

    @rule(actor=actors, name=session_names, token=tokens)
    def unpreserve_fd(self, actor: str, name: str, token: str) -> None:
        errors = set() if NAME_RE.fullmatch(token) else {"InvalidArgument"}
        errors |= self.session_errors(actor, name, {"normal"})
        session = self.sessions.get(name)
        if session is not None:
            if token not in session.fds:
                errors.add("NoSuchToken")
            if any(token in fd.requires for fd in session.fds.values()):
                errors.add("DependencyMissing")
        if self.attempt(errors, lambda: self.core.unpreserve_fd(self.caller(actor), name, token)):
            assert session is not None
            del session.fds[token]

    @rule(actor=actors, name=session_names, token=tokens)
    def retrieve_fd(self, actor: str, name: str, token: str) -> None:
        errors = set() if NAME_RE.fullmatch(token) else {"InvalidArgument"}
        errors |= self.session_errors(actor, name, {"normal", "updated"})
        session = self.sessions.get(name)
        if session is not None:
            if session.finished:
                errors.add("WrongState")
            fd = session.fds.get(token)
            if fd is None or fd.lost:
                errors.add("NoSuchToken")

        def retrieve() -> list[Record]:
            self.core.check_retrieve_fd(self.caller(actor), name, token)
            entry = self.core.sessions[name].fds[token]
            if self.core.phase is Phase.UPDATED and not entry.restored:
                return self.core.fd_restored(name, token)  # what the service does
            return []

        if self.attempt(errors, retrieve) and self.phase == "updated":
            assert session is not None
            session.fds[token].restored = True

    @rule(actor=actors, name=session_names)
    def close_session(self, actor: str, name: str) -> None:
        errors = self.session_errors(actor, name, {"normal"})
        if self.attempt(errors, lambda: self.core.close_session(self.caller(actor), name)):
            del self.sessions[name]

    @rule(actor=actors, name=session_names, enable=st.booleans())
    def delay_freeze(self, actor: str, name: str, enable: bool) -> None:
        errors = self.session_errors(actor, name, {"normal"})
        if self.attempt(errors, lambda: self.core.delay_freeze(self.caller(actor), name, enable)):
            self.sessions[name].delay = enable

    @rule(actor=actors, name=session_names)
    def ready_for_freeze(self, actor: str, name: str) -> None:
        errors = self.session_errors(actor, name, {"prepared"})
        if self.attempt(errors, lambda: self.core.ready_for_freeze(self.caller(actor), name)):
            self.sessions[name].ready = True

    @rule(actor=actors, name=session_names)
    def finish_session(self, actor: str, name: str) -> None:
        errors = self.session_errors(actor, name, {"updated"})
        if self.attempt(errors, lambda: self.core.finish_session(self.caller(actor), name)):
            session = self.sessions[name]
            if not session.finished:
                session.fds = {t: fd for t, fd in session.fds.items() if fd.restored}
            session.finished = True

    @rule(actor=actors)
    def client_leaves(self, actor: str) -> None:
        """The actor's connection leaves the bus; it comes back under a new unique name."""
        gone = self.clients[actor]
        self.records += self.core.client_gone(gone)
        if self.phase == "normal":
            self.sessions = {n: s for n, s in self.sessions.items()
                             if s.client != gone or s.prepared}
        self.clients[actor] = self._new_client()

    @precondition(lambda self: self.phase == "normal" and self.sessions)
    @rule(data=st.data())
    def restart_loses_fds(self, data: st.DataObject) -> None:
        """A daemon restart without an fd store: some journaled fds are gone."""
        keys = [(n, t) for n, s in self.sessions.items() for t in s.fds]
        lost = data.draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []
        self.records += self.core.fds_lost(lost)
        for n, t in lost:
            self.sessions[n].fds[t].lost = True

    # ---- the host's update --------------------------------------------------------------

    def run_host_command(self, command: str, caller: Caller) -> list[Record]:
        """The command as the service drives it: it holds in_flight until done()."""
        core = self.core
        if command == "freeze":
            attempt = core.begin_freeze(caller)
            try:
                sizes = {(s.name, t): e.size
                         for s in core.sessions.values() for t, e in s.fds.items()}
                return core.freeze(caller, sizes, attempt)
            finally:
                core.done("Freeze", attempt)
        records: list[Record] = getattr(core, command)(caller)
        core.done(command.capitalize())
        return records

    def host_command(self, actor: str, command: str, allowed: set[str]) -> bool:
        errors = set()
        if UIDS[actor] != 0:
            errors.add("AccessDenied")
        if self.phase not in allowed:
            errors.add("WrongState")
        if command == "freeze" and self.phase == "prepared" and self.missing():
            errors.add("DependencyMissing")
        before = self.core.snapshot()
        ok = self.attempt(errors, lambda: self.run_host_command(command, self.caller(actor)))
        assert self.core.in_flight == "", f"{command} left {self.core.in_flight} in flight"
        if ok and command == "prepare":
            self.before_prepare = _without_history(before)
        return ok

    @rule(actor=actors)
    def prepare(self, actor: str) -> None:
        if self.host_command(actor, "prepare", {"normal"}):
            self.phase = "prepared"
            for s in self.sessions.values():
                s.ready = False
                s.prepared = True

    @rule(actor=actors)
    def freeze(self, actor: str) -> None:
        laggards = self.core.freeze_laggards()
        assert laggards == sorted(n for n, s in self.sessions.items() if s.delay and not s.ready)
        if self.host_command(actor, "freeze", {"prepared"}):
            self.phase = "frozen"
            assert not self.missing()

    @rule(actor=actors)
    def cancel(self, actor: str) -> None:
        if self.host_command(actor, "cancel", {"prepared", "frozen"}):
            self.phase = "normal"
            for s in self.sessions.values():
                s.ready = False
            # All of the update undone, but its sessions keep having been through a
            # Prepare (docs/API.md: from Prepare on a session survives its client, even
            # after a Cancel).
            assert self.before_prepare is not None
            undone = [replace(r, prepared=True) if isinstance(r, SessionCreated) else r
                      for r in self.before_prepare]
            assert _without_history(self.core.snapshot()) == undone, (
                "Cancel did not undo the update"
            )

    @rule(actor=actors, fails=st.booleans())
    def reboot(self, actor: str, fails: bool) -> None:
        """Reboot (journaled: RebootStarted), then either the handover cannot be written
        (a plain FROZEN again) or the new kernel's daemon replays the journal and finds
        the handover."""
        errors = set() if self.phase == "frozen" else {"WrongState"}
        if UIDS[actor] != 0:
            errors.add("AccessDenied")
        if not self.attempt(errors, lambda: self.core.begin_reboot(self.caller(actor), "boot")):
            return
        assert self.core.reboot is not None and self.core.in_flight == "Reboot"
        if fails:
            self.records += self.core.reboot_failed("the disk is full")
            assert self.core.reboot is None and self.core.in_flight == ""
            return
        self.core = replay(self.records, lambda: next(self.clock))  # the new kernel's start
        assert self.core.is_new_boot("boot", "next-boot")
        if self.attempt(set(), lambda: self.core.rebooted("next-boot")):
            self.phase = "updated"
            for s in self.sessions.values():
                s.ready = False

    @rule()
    def rebooted_without_a_reboot(self) -> None:
        """A handover found in any other phase than frozen is refused."""
        if self.phase != "frozen":
            self.attempt({"WrongState"}, lambda: self.core.rebooted("next-boot"))

    @rule(actor=actors)
    def finish(self, actor: str) -> None:
        if self.host_command(actor, "finish", {"updated"}):
            self.phase = "normal"
            self.sessions.clear()
            assert self.core.snapshot() == []

    @rule()
    def restart(self) -> None:
        """A daemon restart: the journal replays; or a compaction: the snapshot does."""
        self.core = replay(self.records, lambda: next(self.clock))
        self.records = self.core.snapshot()
        self.core = replay(self.records, lambda: next(self.clock))

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def journal_replays_to_the_live_state(self) -> None:
        assert replay(self.records).snapshot() == self.core.snapshot()
        assert replay(self.core.snapshot()).snapshot() == self.core.snapshot()

    @invariant()
    def state_equals_the_model(self) -> None:
        assert self.core.phase.value == self.phase
        assert set(self.core.sessions) == set(self.sessions)
        for name, model in self.sessions.items():
            live = self.core.sessions[name]
            assert (live.uid, live.client, live.delay_freeze, live.ready, live.finished,
                    live.prepared) == (model.uid, model.client, model.delay, model.ready,
                                       model.finished, model.prepared), name
            assert {t: (e.requires, e.size, e.problem == "lost", e.restored)
                    for t, e in live.fds.items()} == {
                t: (fd.requires, fd.size, fd.lost, fd.restored) for t, fd in model.fds.items()
            }, name

    @invariant()
    def limits_hold(self) -> None:
        core = self.core
        assert len(core.sessions) <= LIMITS.max_sessions
        for uid in {s.uid for s in core.sessions.values()} - {0}:
            owned = sum(1 for s in core.sessions.values() if s.uid == uid)
            assert owned <= LIMITS.max_sessions_per_uid
        assert all(len(s.fds) <= LIMITS.max_fds_per_session for s in core.sessions.values())
        assert core.total_preserved_bytes() <= LIMITS.max_preserved_bytes
        for uid in set(UIDS.values()):  # what the per-uid limits are checked against
            assert core.uid_usage(uid) == self.uid_usage(uid), uid

    @invariant()
    def no_dependency_cycles(self) -> None:
        for session in self.core.sessions.values():
            held = {t: f.requires for t, f in self.sessions[session.name].fds.items()}
            for token, entry in session.fds.items():
                assert not closes_cycle(held, token, entry.requires)

    @invariant()
    def visibility_follows_ownership(self) -> None:
        for actor in UIDS:
            caller = self.caller(actor)
            visible = {s.name for s in self.core.visible_sessions(caller)}
            assert visible == {
                n for n, s in self.sessions.items() if caller.uid in (0, s.uid)
            }


def replay(records: list[Record], clock: Callable[[], int] | None = None) -> Orchestrator:
    core = Orchestrator(LIMITS, clock_usec=clock) if clock else Orchestrator(LIMITS)
    for record in records:
        core.apply(record)
    return core


MACHINE_SETTINGS = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
)


TestCoreRules = CoreMachine.TestCase
TestCoreRules.settings = settings(MACHINE_SETTINGS, max_examples=60, stateful_step_count=30)


class LongCoreMachine(CoreMachine):
    """The same machine, for many more and longer runs (make test-slow)."""


TestCoreRulesLong = pytest.mark.slow(LongCoreMachine.TestCase)
TestCoreRulesLong.settings = settings(MACHINE_SETTINGS, max_examples=1000,
                                      stateful_step_count=60)


def _without_history(records: list[Record]) -> list[Record]:
    """The state a Cancel must restore: all but the update history, which gains a cycle."""
    return [r for r in records if not isinstance(r, CycleRecorded)]
