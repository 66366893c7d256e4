"""The orchestrator core, driven directly: one rule, one test."""

from collections.abc import Callable
from dataclasses import replace

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
from liveupdated.core.records import CycleRecorded, DaemonStarted, Record, SessionCreated

ROOT = Caller(uid=0, unit="", client=":1.1", admin=True)
ALICE = Caller(uid=1000, unit="vmm@a.service", client=":1.2", admin=False)
BOB = Caller(uid=1001, unit="", client=":1.3", admin=False)
FACTS = FdFacts(kind="memfd", size=4096, name="ram", seals=0)


VM = "1000-vm"  # ALICE's session: a non-admin's names start with its uid


def core_with(*tokens: str, owner: Caller = ALICE, limits: Limits | None = None) -> Orchestrator:
    core = Orchestrator(limits)
    core.create_session(owner, VM)
    for token in tokens:
        core.preserve_fd(owner, VM, token, [], FACTS)
    return core


# The host commands as the service drives them: each holds core.in_flight until done().
def prepare(core: Orchestrator, caller: Caller = ROOT) -> list[Record]:
    records = core.prepare(caller)
    core.done("Prepare")
    return records


def freeze(core: Orchestrator, caller: Caller = ROOT) -> list[Record]:
    attempt = core.begin_freeze(caller)
    try:
        sizes = {(s.name, t): e.size for s in core.sessions.values() for t, e in s.fds.items()}
        return core.freeze(caller, sizes, attempt)
    finally:
        core.done("Freeze", attempt)


def cancel(core: Orchestrator, caller: Caller = ROOT) -> list[Record]:
    records = core.cancel(caller)
    core.done("Cancel")
    return records


def finish(core: Orchestrator, caller: Caller = ROOT) -> list[Record]:
    records = core.finish(caller)
    core.done("Finish")
    return records


HOST_COMMANDS: dict[str, Callable[[Orchestrator, Caller], list[Record]]] = {
    "prepare": prepare, "freeze": freeze, "cancel": cancel, "finish": finish,
}


def replayed(core: Orchestrator, records: list) -> Orchestrator:  # type: ignore[type-arg]
    fresh = Orchestrator(core.limits)
    for record in records:
        fresh.apply(record)
    return fresh


def test_full_cycle_moves_through_every_phase() -> None:
    core = core_with("ram")
    phases = []
    steps: list[Callable[[], object]] = [
        lambda: prepare(core), lambda: freeze(core),
        lambda: core.rebooted("boot-a"), lambda: finish(core),
    ]
    for step in steps:
        step()
        phases.append(core.phase)
    assert phases == [Phase.PREPARED, Phase.FROZEN, Phase.UPDATED, Phase.NORMAL]
    assert core.sessions == {}


@pytest.mark.parametrize("command", ["prepare", "freeze", "cancel", "finish"])
def test_host_commands_are_roots(command: str) -> None:
    core = core_with()
    with pytest.raises(AccessDenied, match="root, or a user that polkit allows"):
        HOST_COMMANDS[command](core, ALICE)


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
        HOST_COMMANDS[step](core, ROOT)
    before = core.phase
    with pytest.raises(WrongState, match=before.value):
        HOST_COMMANDS[command](core, ROOT)
    assert core.phase is before


def test_a_host_command_under_way_refuses_the_next_until_done() -> None:
    core = core_with("ram")
    core.prepare(ROOT)
    with pytest.raises(WrongState, match="while Prepare is under way"):
        cancel(core)
    core.done("Prepare")
    attempt = core.begin_freeze(ROOT)
    with pytest.raises(WrongState, match="while Freeze is under way"):
        core.begin_freeze(ROOT)
    cancel(core)  # Cancel may interrupt a Freeze waiting on its barrier
    with pytest.raises(WrongState, match="interrupted"):
        core.freeze(ROOT, {(VM, "ram"): FACTS.size}, attempt)
    core.done("Freeze", attempt)
    assert core.phase is Phase.NORMAL and core.in_flight == ""


def test_session_commands_only_in_their_phase() -> None:
    core = core_with("ram")
    prepare(core)
    with pytest.raises(WrongState):
        core.create_session(ALICE, "1000-other")
    with pytest.raises(WrongState):
        core.preserve_fd(ALICE, VM, "more", [], FACTS)
    with pytest.raises(WrongState):
        core.unpreserve_fd(ALICE, VM, "ram")
    with pytest.raises(WrongState):
        core.close_session(ALICE, VM)
    with pytest.raises(WrongState):
        core.check_retrieve_fd(ALICE, VM, "ram")


def test_names_are_validated() -> None:
    core = Orchestrator()
    for bad in ["", "a" * 64, "has space", "colon:", "slash/", "ünï"]:
        with pytest.raises(InvalidArgument, match="A-Za-z0-9"):
            core.create_session(ALICE, bad)
    longest = "1000-" + "a" * 58
    core.create_session(ALICE, longest)
    with pytest.raises(InvalidArgument):
        core.preserve_fd(ALICE, longest, "bad token", [], FACTS)


def test_session_names_of_non_admins_start_with_their_uid() -> None:
    core = Orchestrator()
    for bad in ["vm", "1001-vm", "1000vm", "0-vm", "10000-vm"]:
        with pytest.raises(InvalidArgument, match=r"uid 1000 must be named '1000-<name>'"):
            core.create_session(ALICE, bad)
    assert core.sessions == {}
    core.create_session(ALICE, "1000-vm")
    core.create_session(ROOT, "vm")  # admins name freely, another uid's prefix included
    core.create_session(ROOT, "1001-vm")
    core.create_session(Caller(uid=1002, unit="", client=":1.9", admin=True), "free")
    assert sorted(core.sessions) == ["1000-vm", "1001-vm", "free", "vm"]


def test_duplicate_session_and_token_are_refused() -> None:
    core = core_with("ram")
    with pytest.raises(SessionExists):
        core.create_session(ROOT, VM)  # even an admin cannot take a name in use
    with pytest.raises(TokenExists):
        core.preserve_fd(ALICE, VM, "ram", [], FACTS)


def test_only_owner_or_root_may_touch_a_session() -> None:
    core = core_with("ram")
    for action in (
        lambda c: core.preserve_fd(c, VM, "x", [], FACTS),
        lambda c: core.unpreserve_fd(c, VM, "ram"),
        lambda c: core.check_retrieve_fd(c, VM, "ram"),
        lambda c: core.close_session(c, VM),
        lambda c: core.delay_freeze(c, VM, True),
    ):
        with pytest.raises(AccessDenied, match="uid 1000"):
            action(BOB)
    assert [s.name for s in core.visible_sessions(BOB)] == []
    assert [s.name for s in core.visible_sessions(ALICE)] == [VM]
    assert [s.name for s in core.visible_sessions(ROOT)] == [VM]
    core.preserve_fd(ROOT, VM, "by-root", [], FACTS)


def test_missing_dependency_fails_freeze_and_names_it() -> None:
    core = core_with("ram")
    core.preserve_fd(ALICE, VM, "kvm", ["ram", "vfio"], FACTS)
    prepare(core)
    with pytest.raises(DependencyMissing, match=r"vm/vfio \(required by kvm\)"):
        freeze(core)
    assert core.phase is Phase.PREPARED


def test_unpreserve_of_a_required_token_is_refused_naming_dependents() -> None:
    core = core_with("ram")
    core.preserve_fd(ALICE, VM, "kvm", ["ram"], FACTS)
    with pytest.raises(DependencyMissing, match="required by kvm"):
        core.unpreserve_fd(ALICE, VM, "ram")
    core.unpreserve_fd(ALICE, VM, "kvm")
    core.unpreserve_fd(ALICE, VM, "ram")
    assert core.sessions[VM].fds == {}


@pytest.mark.parametrize(
    ("existing", "token", "requires"),
    [([], "a", ["a"]), ([("a", ["b"])], "b", ["a"]), ([("a", ["c"]), ("b", ["a"])], "c", ["b"])],
)
def test_dependency_cycles_are_refused(
    existing: list[tuple[str, list[str]]], token: str, requires: list[str]
) -> None:
    core = core_with()
    for t, r in existing:
        core.preserve_fd(ALICE, VM, t, r, FACTS)
    with pytest.raises(InvalidArgument, match="cycle"):
        core.preserve_fd(ALICE, VM, token, requires, FACTS)
    assert token not in core.sessions[VM].fds


def test_duplicate_requires_are_refused() -> None:
    core = core_with("ram")
    with pytest.raises(InvalidArgument, match="twice"):
        core.preserve_fd(ALICE, VM, "kvm", ["ram", "ram"], FACTS)


def test_cancel_returns_exactly_to_normal() -> None:
    core = core_with("ram", "disk")
    core.delay_freeze(ALICE, VM, True)
    before = core.snapshot()
    prepare(core)
    core.ready_for_freeze(ALICE, VM)
    freeze(core)
    cancel(core)
    assert core.phase is Phase.NORMAL
    after = core.snapshot()  # all as before, and the cycle in the history
    # ... but that its sessions went through Prepare: never dropped for a departed client.
    unprepared = [replace(r, prepared=False) if isinstance(r, SessionCreated) else r
                  for r in after if not isinstance(r, CycleRecorded)]
    assert unprepared == before
    assert all(s.prepared for s in core.sessions.values())
    [cancelled] = [r for r in after if isinstance(r, CycleRecorded)]
    assert cancelled.cycle.outcome == "cancelled"


def test_client_leaving_before_prepare_drops_its_sessions_only() -> None:
    core = core_with("ram")
    core.create_session(BOB, "1001-other")
    records = core.client_gone(ALICE.client)
    assert [r.type for r in records] == ["fd_released", "session_dropped"]
    assert list(core.sessions) == ["1001-other"]


def test_sessions_outlive_their_client_from_prepare_on() -> None:
    core = core_with("ram")
    prepare(core)
    assert core.client_gone(ALICE.client) == []
    assert VM in core.sessions


def test_session_limits() -> None:
    core = Orchestrator(Limits(max_sessions=2, max_fds_per_session=1, max_sessions_per_uid=1))
    core.create_session(ALICE, "1000-a")
    with pytest.raises(QuotaExceeded, match="maximum of 1 sessions"):
        core.create_session(ALICE, "1000-b")
    core.create_session(ROOT, "r")
    with pytest.raises(QuotaExceeded, match="maximum of 2 sessions"):
        core.create_session(BOB, "1001-c")
    core.preserve_fd(ALICE, "1000-a", "one", [], FACTS)
    with pytest.raises(QuotaExceeded, match="maximum of 1 fds"):
        core.preserve_fd(ALICE, "1000-a", "two", [], FACTS)


def test_preserved_bytes_limit_names_the_limit() -> None:
    # a per-uid budget above the host's: the host's limit is the one that binds here
    core = core_with(limits=Limits(max_preserved_bytes=6000, max_bytes_per_uid=10_000))
    core.preserve_fd(ALICE, VM, "a", [], FACTS)
    with pytest.raises(QuotaExceeded, match="no room for 4096 more") as refused:
        core.preserve_fd(ALICE, VM, "b", [], FACTS)
    assert "6000" not in str(refused.value)  # a tenant is not told the host's figures
    with pytest.raises(QuotaExceeded, match="limit of 6000 bytes"):
        core.preserve_fd(ROOT, VM, "b", [], FACTS)
    assert core.total_preserved_bytes() == 4096


def test_per_uid_limits_bind_every_uid_but_roots() -> None:
    # max_bytes_per_uid unset: a quarter of the host's 32 KiB
    core = core_with("a", "b", limits=Limits(max_preserved_bytes=8 * 4096, max_fds_per_uid=3))
    with pytest.raises(
        QuotaExceeded, match="uid 1000 holds 8192 bytes; 4096 more would pass its limit of 8192"
    ):
        core.preserve_fd(ALICE, VM, "c", [], FACTS)
    small = FdFacts(kind="memfd", size=0, name="", seals=0)
    core.preserve_fd(ALICE, VM, "c", [], small)
    core.create_session(ALICE, "1000-two")  # the fd limit counts every session of the uid
    with pytest.raises(QuotaExceeded, match="uid 1000 holds 3 fds; 1 more would pass its limit"):
        core.preserve_fd(ALICE, "1000-two", "d", [], small)
    core.create_session(BOB, "1001-vm")  # another uid has its own budget
    core.preserve_fd(BOB, "1001-vm", "x", [], FACTS)
    # Root preserving into uid 1000's session spends uid 1000's budget: what Freeze
    # checks per owner must be what admission checked.
    with pytest.raises(QuotaExceeded, match="uid 1000 holds 3 fds"):
        core.preserve_fd(ROOT, VM, "d", [], small)
    core.create_session(ROOT, "vm-root")
    for token in "defg":  # root's own sessions are bound by the host's limit only
        core.preserve_fd(ROOT, "vm-root", token, [], FACTS if token == "d" else small)
    assert core.uid_usage(1000) == (3, 2 * 4096)
    assert core.uid_usage(0) == (4, 4096)


def test_default_limits_do_not_exceed_the_kernels() -> None:
    limits = Limits()
    assert limits.max_sessions <= 744
    assert limits.max_fds_per_session <= 128


def test_freeze_laggards_are_sessions_that_delay_and_are_not_ready() -> None:
    core = core_with()
    core.create_session(BOB, "1001-b")
    core.delay_freeze(ALICE, VM, True)
    core.delay_freeze(BOB, "1001-b", True)
    prepare(core)
    assert core.freeze_laggards() == [VM, "1001-b"]
    core.ready_for_freeze(BOB, "1001-b")
    assert core.freeze_laggards() == [VM]


def test_session_finish_releases_unretrieved_fds() -> None:
    core = core_with("ram", "disk")
    prepare(core)
    freeze(core)
    core.rebooted("boot")
    core.check_retrieve_fd(ALICE, VM, "ram")
    core.fd_restored(VM, "ram")
    records = core.finish_session(ALICE, VM)
    assert [(r.type, getattr(r, "token", None)) for r in records] == [
        ("fd_released", "disk"), ("session_finished", None)
    ]
    with pytest.raises(WrongState, match="finished"):
        core.check_retrieve_fd(ALICE, VM, "ram")


def test_lost_fds_fail_freeze_and_cannot_be_retrieved() -> None:
    core = core_with("ram")
    core.fds_lost([(VM, "ram")])
    with pytest.raises(NoSuchToken, match="lost"):
        core.check_retrieve_fd(ALICE, VM, "ram")
    prepare(core)
    with pytest.raises(DependencyMissing, match="lost"):
        freeze(core)


def test_unknown_session_is_named() -> None:
    with pytest.raises(NoSuchSession, match="'ghost'"):
        Orchestrator().session("ghost")


def test_records_replay_to_the_same_state() -> None:
    core = Orchestrator()
    log = core.create_session(ALICE, VM)
    log += core.preserve_fd(ALICE, VM, "ram", [], FACTS)
    log += core.preserve_fd(ALICE, VM, "kvm", ["ram"], FACTS)
    log += core.delay_freeze(ALICE, VM, True)
    log += core.create_session(BOB, "1001-gone")
    log += core.client_gone(BOB.client)
    log += prepare(core)
    log += core.ready_for_freeze(ALICE, VM)
    log += freeze(core)
    copy = replayed(core, log)
    assert copy.snapshot() == core.snapshot()
    for c in (core, copy):
        assert c.fd_count() == sum(len(s.fds) for s in c.sessions.values()) == 2
        assert c.total_preserved_bytes() == 2 * FACTS.size
    assert replayed(core, core.snapshot()).snapshot() == core.snapshot()


def test_a_daemon_start_changes_nothing_and_the_latest_is_kept() -> None:
    core = core_with("ram")
    prepare(core)
    before = core.snapshot()
    first = DaemonStarted(version="0.1.0", boot_id="a" * 32, at_usec=1)
    latest = DaemonStarted(version="0.2.0", boot_id="b" * 32, at_usec=2)
    core.apply(first)
    core.apply(latest)
    after = core.snapshot()
    assert [r for r in after if not isinstance(r, DaemonStarted)] == before
    assert [r for r in after if isinstance(r, DaemonStarted)] == [latest]
    assert replayed(core, after).snapshot() == after  # compaction keeps it
    assert core.phase is Phase.PREPARED


def test_a_cancelled_freeze_leaves_no_blackout_start_behind() -> None:
    clock = iter(range(1_000, 10_000, 1_000))
    core = Orchestrator(clock_usec=lambda: next(clock))
    prepare(core)
    freeze(core)
    cancel(core)
    prepare(core)
    assert core.freeze_started_usec == 0
    assert replayed(core, core.snapshot()).snapshot() == core.snapshot()


def test_retrieve_fds_checks_the_count_then_doubles_then_each_token() -> None:
    core = core_with("ram", "disk")
    prepare(core)
    freeze(core)
    core.rebooted("boot")
    assert [e.token for e in core.check_retrieve_fds(ALICE, VM, ["disk", "ram"], "RetrieveFds")
            ] == ["disk", "ram"]
    with pytest.raises(InvalidArgument, match="RetrieveFds takes at most 16 tokens a call, "
                                              "not 17"):
        core.check_retrieve_fds(ALICE, VM, ["ram"] * 17, "RetrieveFds")
    with pytest.raises(InvalidArgument, match="RetrieveFds names token 'ram' twice"):
        core.check_retrieve_fds(ALICE, VM, ["ram", "disk", "ram"], "RetrieveFds")
    with pytest.raises(NoSuchToken, match="rom"):
        core.check_retrieve_fds(ALICE, VM, ["ram", "rom"], "RetrieveFds")
    with pytest.raises(AccessDenied):
        core.check_retrieve_fds(BOB, VM, ["ram"], "RetrieveFds")
