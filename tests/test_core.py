"""The orchestrator core, driven directly: one rule, one test."""

from collections.abc import Callable

import pytest

from liveupdated.core.errors import (
    AccessDenied,
    DependencyMissing,
    InvalidArgument,
    NoSuchSession,
    NoSuchToken,
    QuotaExceeded,
    SessionExists,
    TokenExists,
    WrongState,
)
from liveupdated.core.orchestrator import Caller, FdFacts, Limits, Orchestrator, Phase

ROOT = Caller(uid=0, unit="", client=":1.1", admin=True)
ALICE = Caller(uid=1000, unit="vmm@a.service", client=":1.2", admin=False)
BOB = Caller(uid=1001, unit="", client=":1.3", admin=False)
FACTS = FdFacts(kind="memfd", size=4096, name="ram", seals=0)


def core_with(*tokens: str, owner: Caller = ALICE, limits: Limits | None = None) -> Orchestrator:
    core = Orchestrator(limits)
    core.create_session(owner, "vm")
    for token in tokens:
        core.preserve_fd(owner, "vm", token, [], FACTS)
    return core


def replayed(core: Orchestrator, records: list) -> Orchestrator:  # type: ignore[type-arg]
    fresh = Orchestrator(core.limits)
    for record in records:
        fresh.apply(record)
    return fresh


def test_full_cycle_moves_through_every_phase() -> None:
    core = core_with("ram")
    phases = []
    steps: list[Callable[[], object]] = [
        lambda: core.prepare(ROOT), lambda: core.freeze(ROOT),
        lambda: core.rebooted("boot-a"), lambda: core.finish(ROOT),
    ]
    for step in steps:
        step()
        phases.append(core.phase)
    assert phases == [Phase.PREPARED, Phase.FROZEN, Phase.UPDATED, Phase.NORMAL]
    assert core.sessions == {}


@pytest.mark.parametrize("command", ["prepare", "freeze", "cancel", "finish"])
def test_host_commands_are_roots(command: str) -> None:
    core = core_with()
    with pytest.raises(AccessDenied, match="only root"):
        getattr(core, command)(ALICE)


@pytest.mark.parametrize(
    ("setup", "command"),
    [([], "freeze"), ([], "cancel"), ([], "finish"), (["prepare"], "prepare"),
     (["prepare", "freeze"], "freeze"), (["prepare", "freeze"], "finish")],
)
def test_commands_out_of_phase_raise_wrong_state_naming_the_phase(
    setup: list[str], command: str
) -> None:
    core = core_with()
    for step in setup:
        getattr(core, step)(ROOT)
    before = core.phase
    with pytest.raises(WrongState, match=before.value):
        getattr(core, command)(ROOT)
    assert core.phase is before


def test_session_commands_only_in_their_phase() -> None:
    core = core_with("ram")
    core.prepare(ROOT)
    with pytest.raises(WrongState):
        core.create_session(ALICE, "other")
    with pytest.raises(WrongState):
        core.preserve_fd(ALICE, "vm", "more", [], FACTS)
    with pytest.raises(WrongState):
        core.unpreserve_fd(ALICE, "vm", "ram")
    with pytest.raises(WrongState):
        core.close_session(ALICE, "vm")
    with pytest.raises(WrongState):
        core.check_retrieve_fd(ALICE, "vm", "ram")


def test_names_are_validated() -> None:
    core = Orchestrator()
    for bad in ["", "a" * 64, "has space", "colon:", "slash/", "ünï"]:
        with pytest.raises(InvalidArgument, match="A-Za-z0-9"):
            core.create_session(ALICE, bad)
    core.create_session(ALICE, "a" * 63)
    with pytest.raises(InvalidArgument):
        core.preserve_fd(ALICE, "a" * 63, "bad token", [], FACTS)


def test_duplicate_session_and_token_are_refused() -> None:
    core = core_with("ram")
    with pytest.raises(SessionExists):
        core.create_session(BOB, "vm")
    with pytest.raises(TokenExists):
        core.preserve_fd(ALICE, "vm", "ram", [], FACTS)


def test_only_owner_or_root_may_touch_a_session() -> None:
    core = core_with("ram")
    for action in (
        lambda c: core.preserve_fd(c, "vm", "x", [], FACTS),
        lambda c: core.unpreserve_fd(c, "vm", "ram"),
        lambda c: core.check_retrieve_fd(c, "vm", "ram"),
        lambda c: core.close_session(c, "vm"),
        lambda c: core.delay_freeze(c, "vm", True),
    ):
        with pytest.raises(AccessDenied, match="uid 1000"):
            action(BOB)
    assert [s.name for s in core.visible_sessions(BOB)] == []
    assert [s.name for s in core.visible_sessions(ALICE)] == ["vm"]
    assert [s.name for s in core.visible_sessions(ROOT)] == ["vm"]
    core.preserve_fd(ROOT, "vm", "by-root", [], FACTS)


def test_missing_dependency_fails_freeze_and_names_it() -> None:
    core = core_with("ram")
    core.preserve_fd(ALICE, "vm", "kvm", ["ram", "vfio"], FACTS)
    core.prepare(ROOT)
    with pytest.raises(DependencyMissing, match=r"vm/vfio \(required by kvm\)"):
        core.freeze(ROOT)
    assert core.phase is Phase.PREPARED


def test_unpreserve_of_a_required_token_is_refused_naming_dependents() -> None:
    core = core_with("ram")
    core.preserve_fd(ALICE, "vm", "kvm", ["ram"], FACTS)
    with pytest.raises(DependencyMissing, match="required by kvm"):
        core.unpreserve_fd(ALICE, "vm", "ram")
    core.unpreserve_fd(ALICE, "vm", "kvm")
    core.unpreserve_fd(ALICE, "vm", "ram")
    assert core.sessions["vm"].fds == {}


@pytest.mark.parametrize(
    ("existing", "token", "requires"),
    [([], "a", ["a"]), ([("a", ["b"])], "b", ["a"]), ([("a", ["c"]), ("b", ["a"])], "c", ["b"])],
)
def test_dependency_cycles_are_refused(
    existing: list[tuple[str, list[str]]], token: str, requires: list[str]
) -> None:
    core = core_with()
    for t, r in existing:
        core.preserve_fd(ALICE, "vm", t, r, FACTS)
    with pytest.raises(InvalidArgument, match="cycle"):
        core.preserve_fd(ALICE, "vm", token, requires, FACTS)
    assert token not in core.sessions["vm"].fds


def test_duplicate_requires_are_refused() -> None:
    core = core_with("ram")
    with pytest.raises(InvalidArgument, match="twice"):
        core.preserve_fd(ALICE, "vm", "kvm", ["ram", "ram"], FACTS)


def test_cancel_returns_exactly_to_normal() -> None:
    core = core_with("ram", "disk")
    core.delay_freeze(ALICE, "vm", True)
    before = core.snapshot()
    core.prepare(ROOT)
    core.ready_for_freeze(ALICE, "vm")
    core.freeze(ROOT)
    core.cancel(ROOT)
    assert core.phase is Phase.NORMAL
    assert core.snapshot() == before


def test_client_leaving_before_prepare_drops_its_sessions_only() -> None:
    core = core_with("ram")
    core.create_session(BOB, "other")
    records = core.client_gone(ALICE.client)
    assert [r.type for r in records] == ["fd_released", "session_dropped"]
    assert list(core.sessions) == ["other"]


def test_sessions_outlive_their_client_from_prepare_on() -> None:
    core = core_with("ram")
    core.prepare(ROOT)
    assert core.client_gone(ALICE.client) == []
    assert "vm" in core.sessions


def test_session_limits() -> None:
    core = Orchestrator(Limits(max_sessions=2, max_fds_per_session=1, max_sessions_per_uid=1))
    core.create_session(ALICE, "a")
    with pytest.raises(QuotaExceeded, match="maximum of 1 sessions"):
        core.create_session(ALICE, "b")
    core.create_session(ROOT, "r")
    with pytest.raises(QuotaExceeded, match="maximum of 2 sessions"):
        core.create_session(BOB, "c")
    core.preserve_fd(ALICE, "a", "one", [], FACTS)
    with pytest.raises(QuotaExceeded, match="maximum of 1 fds"):
        core.preserve_fd(ALICE, "a", "two", [], FACTS)


def test_preserved_bytes_limit_names_the_limit() -> None:
    core = core_with(limits=Limits(max_preserved_bytes=6000))
    core.preserve_fd(ALICE, "vm", "a", [], FACTS)
    with pytest.raises(QuotaExceeded, match="limit of 6000 bytes"):
        core.preserve_fd(ALICE, "vm", "b", [], FACTS)


def test_default_limits_do_not_exceed_the_kernels() -> None:
    limits = Limits()
    assert limits.max_sessions <= 744
    assert limits.max_fds_per_session <= 128


def test_freeze_laggards_are_sessions_that_delay_and_are_not_ready() -> None:
    core = core_with()
    core.create_session(BOB, "b")
    core.delay_freeze(ALICE, "vm", True)
    core.delay_freeze(BOB, "b", True)
    core.prepare(ROOT)
    assert core.freeze_laggards() == ["b", "vm"]
    core.ready_for_freeze(BOB, "b")
    assert core.freeze_laggards() == ["vm"]


def test_session_finish_releases_unretrieved_fds() -> None:
    core = core_with("ram", "disk")
    core.prepare(ROOT)
    core.freeze(ROOT)
    core.rebooted("boot")
    core.check_retrieve_fd(ALICE, "vm", "ram")
    core.fd_restored("vm", "ram")
    records = core.finish_session(ALICE, "vm")
    assert [(r.type, getattr(r, "token", None)) for r in records] == [
        ("fd_released", "disk"), ("session_finished", None)
    ]
    with pytest.raises(WrongState, match="finished"):
        core.check_retrieve_fd(ALICE, "vm", "ram")


def test_lost_fds_fail_freeze_and_cannot_be_retrieved() -> None:
    core = core_with("ram")
    core.fds_lost([("vm", "ram")])
    with pytest.raises(NoSuchToken, match="lost"):
        core.check_retrieve_fd(ALICE, "vm", "ram")
    core.prepare(ROOT)
    with pytest.raises(DependencyMissing, match="lost"):
        core.freeze(ROOT)


def test_unknown_session_is_named() -> None:
    with pytest.raises(NoSuchSession, match="'ghost'"):
        Orchestrator().session("ghost")


def test_records_replay_to_the_same_state() -> None:
    core = Orchestrator()
    log = core.create_session(ALICE, "vm")
    log += core.preserve_fd(ALICE, "vm", "ram", [], FACTS)
    log += core.preserve_fd(ALICE, "vm", "kvm", ["ram"], FACTS)
    log += core.delay_freeze(ALICE, "vm", True)
    log += core.create_session(BOB, "gone")
    log += core.client_gone(BOB.client)
    log += core.prepare(ROOT)
    log += core.ready_for_freeze(ALICE, "vm")
    log += core.freeze(ROOT)
    copy = replayed(core, log)
    assert copy.snapshot() == core.snapshot()
    for c in (core, copy):
        assert c.fd_count() == sum(len(s.fds) for s in c.sessions.values()) == 2
        assert c.total_preserved_bytes() == 2 * FACTS.size
    assert replayed(core, core.snapshot()).snapshot() == core.snapshot()


def test_a_cancelled_freeze_leaves_no_blackout_start_behind() -> None:
    clock = iter(range(1_000, 10_000, 1_000))
    core = Orchestrator(clock_usec=lambda: next(clock))
    core.prepare(ROOT)
    core.freeze(ROOT)
    core.cancel(ROOT)
    core.prepare(ROOT)
    assert core.freeze_started_usec == 0
    assert replayed(core, core.snapshot()).snapshot() == core.snapshot()
