"""Manager.Freeze in the core: Orchestrator.begin_freeze before the barrier (the admin's;
state prepared; every requirement held, no fd lost or corrupted, nothing quarantined),
then Orchestrator.freeze after it, which asks every question again (the attempt still the
one waiting, the phase, the dependencies) and checks the bytes the fds hold now against
each uid's budget and the host's. freeze_laggards: the sessions the barrier waits for."""

import pytest

from liveupdated.core.errors import AccessDenied, DependencyMissing, QuotaExceeded, WrongState
from liveupdated.core.orchestrator import Limits, Phase
from liveupdated.core.records import FdCorrupted, FdLost, PhaseChanged
from tests.core.steps import (
    ALICE,
    BOB,
    PAGE,
    ROOT,
    VM,
    cancel,
    core_with,
    facts,
    in_phase,
    prepare,
    refused,
    seen,
    sizes_now,
)


def test_to_frozen_after_the_barrier_recorded_with_when_and_who() -> None:
    core = in_phase(Phase.PREPARED, "ram")
    before = seen(core)
    attempt = core.begin_freeze(ROOT)
    assert (core.in_flight, core.phase) == ("Freeze", Phase.PREPARED)
    assert seen(core).snapshot == before.snapshot  # the wait records nothing
    [record] = core.freeze(ROOT, sizes_now(core), attempt)
    assert isinstance(record, PhaseChanged)
    assert (record.old, record.new, record.by_uid) == ("prepared", "frozen", 0)
    assert core.phase is Phase.FROZEN
    assert core.freeze_started_usec == record.at_usec
    assert core.in_flight == "Freeze"  # until the service is done with it
    core.done("Freeze", attempt)
    assert core.in_flight == ""
    assert core.cycle is not None and core.cycle.frozen_usec == record.at_usec


def test_the_barrier_waits_for_the_sessions_that_delay_it_until_ready() -> None:
    core = core_with()
    core.create_session(BOB, "1001-b")
    core.delay_freeze(ALICE, VM, True)
    prepare(core)
    assert core.freeze_laggards() == [VM]
    core.ready_for_freeze(ALICE, VM)
    assert core.freeze_laggards() == []


def test_a_missing_requirement_names_the_token_and_the_sessions_blocking() -> None:
    core = core_with("ram")
    core.preserve_fd(ALICE, VM, "kvm", ["ram", "vfio"], facts())
    core.create_session(BOB, "1001-b")
    core.preserve_fd(BOB, "1001-b", "dev", ["gpu"], facts())
    prepare(core)
    with refused(core, DependencyMissing,
                 r"missing: 1000-vm/vfio \(required by kvm\); 1001-b/gpu \(required by dev\)"
                 r"\. Sessions blocking: 1000-vm, 1001-b"):
        core.begin_freeze(ROOT)


@pytest.mark.parametrize(("record", "says"), [
    (FdLost(session=VM, token="ram"), "lost in a daemon restart"),
    (FdCorrupted(session=VM, token="rom", size=PAGE), "journal record is corrupted"),
])
def test_a_lost_or_corrupted_fd_blocks_it(record: FdLost | FdCorrupted, says: str) -> None:
    core = core_with("ram")
    core.apply(record)  # what recovery records
    prepare(core)
    with refused(core, DependencyMissing, says):
        core.begin_freeze(ROOT)


def test_an_fd_grown_past_its_uids_budget_blocks_naming_its_session() -> None:
    core = core_with("ram", limits=Limits(max_bytes_per_uid=2 * PAGE))
    core.create_session(BOB, "1001-b")
    core.preserve_fd(BOB, "1001-b", "ram", [], facts())
    prepare(core)
    attempt = core.begin_freeze(ROOT)
    grown = {**sizes_now(core), (VM, "ram"): 3 * PAGE}
    with refused(core, QuotaExceeded,  # uid 1001 is within its budget: not named
                 r"grown past their uid's limit of 8192 bytes\. Sessions blocking: 1000-vm\. "):
        core.freeze(ROOT, grown, attempt)
    assert (core.phase, core.in_flight) == (Phase.PREPARED, "Freeze")
    core.freeze(ROOT, sizes_now(core), attempt)  # shrunk again: it goes through
    assert core.phase is Phase.FROZEN


def test_fds_grown_past_the_hosts_limit_name_the_largest_sessions() -> None:
    core = core_with("ram", limits=Limits(max_preserved_bytes=4 * PAGE,
                                          max_bytes_per_uid=4 * PAGE))
    core.create_session(ROOT, "big")
    core.preserve_fd(ROOT, "big", "ram", [], facts())
    prepare(core)
    attempt = core.begin_freeze(ROOT)
    with refused(core, QuotaExceeded, "over the host's limit of 16384 bytes. Sessions "
                                      "blocking: big, 1000-vm"):
        core.freeze(ROOT, {(VM, "ram"): PAGE * 2, ("big", "ram"): PAGE * 3}, attempt)


def test_a_freeze_interrupted_by_cancel_decides_nothing() -> None:
    core = in_phase(Phase.PREPARED, "ram")
    attempt = core.begin_freeze(ROOT)
    cancel(core)
    with refused(core, WrongState, "Freeze was interrupted while it waited: the state is normal"):
        core.freeze(ROOT, sizes_now(core), attempt)
    core.done("Freeze", attempt)
    assert (core.phase, core.in_flight) == (Phase.NORMAL, "")


def test_an_old_attempt_cannot_decide_for_the_next_one() -> None:
    core = in_phase(Phase.PREPARED, "ram")
    old = core.begin_freeze(ROOT)
    cancel(core)
    prepare(core)
    new = core.begin_freeze(ROOT)
    with refused(core, WrongState, "interrupted"):
        core.freeze(ROOT, sizes_now(core), old)
    core.done("Freeze", old)  # the old one's end does not end the new one's wait
    assert core.in_flight == "Freeze"
    core.freeze(ROOT, sizes_now(core), new)
    core.done("Freeze", new)
    assert (core.phase, core.in_flight) == (Phase.FROZEN, "")


def test_the_admins() -> None:
    core = in_phase(Phase.PREPARED)
    with refused(core, AccessDenied, "polkit allows org.liveupdate1.manage"):
        core.begin_freeze(ALICE)


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.FROZEN, Phase.UPDATED])
def test_only_in_prepared(phase: Phase) -> None:
    core = in_phase(phase)
    with refused(core, WrongState, f"Freeze is allowed in state prepared, not {phase.value}"):
        core.begin_freeze(ROOT)
