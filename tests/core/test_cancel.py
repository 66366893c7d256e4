"""Manager.Cancel in the core (Orchestrator.cancel): the admin's; states prepared and
frozen; back to exactly the normal state before Prepare, every fd still held, the cycle
kept as cancelled; it may interrupt a Freeze waiting on its barrier, not a Reboot writing
the handover; in flight until the handover is discarded."""

import pytest

from liveupdated.core.errors import AccessDenied, WrongState
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import CycleRecorded, PhaseChanged, SessionCreated
from tests.core.steps import (
    ALICE,
    ROOT,
    VM,
    cancel,
    core_with,
    freeze,
    in_phase,
    prepare,
    refused,
    replayed,
)


def _owner(record: SessionCreated) -> tuple[str, int, str, str]:
    return record.session, record.uid, record.unit, record.client


@pytest.mark.parametrize("phase", [Phase.PREPARED, Phase.FROZEN])
def test_back_to_exactly_normal_with_every_fd(phase: Phase) -> None:
    core = core_with("ram", "disk")
    core.delay_freeze(ALICE, VM, True)
    before = core.snapshot()
    log = list(before)
    log += prepare(core)
    log += core.ready_for_freeze(ALICE, VM)
    if phase is Phase.FROZEN:
        log += freeze(core)
    [record] = cancel(core)
    log.append(record)
    assert isinstance(record, PhaseChanged)
    assert (record.old, record.new, record.by_uid) == (phase.value, "normal", 0)
    assert core.phase is Phase.NORMAL and core.freeze_started_usec == 0
    after = core.snapshot()
    # The same sessions (whether they survive their client since is the lifetime rules'),
    # fds, delays: all as before, and the cycle in the history.
    assert [r for r in after if not isinstance(r, CycleRecorded | SessionCreated)] == [
        r for r in before if not isinstance(r, SessionCreated)]
    assert [_owner(r) for r in after if isinstance(r, SessionCreated)] == [
        _owner(r) for r in before if isinstance(r, SessionCreated)]
    [kept] = [r.cycle for r in after if isinstance(r, CycleRecorded)]
    assert (kept.outcome, kept.ended_by) == ("cancelled", 0)
    assert replayed(log).snapshot() == after


def test_in_flight_until_done() -> None:
    core = in_phase(Phase.PREPARED)
    core.cancel(ROOT)
    assert core.in_flight == "Cancel"
    with refused(core, WrongState, "Prepare is not possible while Cancel is under way"):
        core.prepare(ROOT)
    core.done("Cancel")
    prepare(core)


def test_it_interrupts_a_freeze_waiting_on_its_barrier() -> None:
    core = in_phase(Phase.PREPARED, "ram")
    core.begin_freeze(ROOT)
    cancel(core)
    assert (core.phase, core.in_flight) == (Phase.NORMAL, "")


def test_not_while_reboot_writes_the_handover() -> None:
    core = in_phase(Phase.FROZEN, "ram")
    core.begin_reboot(ROOT, "boot-a")
    with refused(core, WrongState, "a Reboot is under way"):
        core.cancel(ROOT)
    core.reboot_failed("the disk is full")
    cancel(core)  # a failed Reboot leaves a plain frozen, which Cancel may leave
    assert core.phase is Phase.NORMAL


def test_the_admins() -> None:
    core = in_phase(Phase.PREPARED)
    with refused(core, AccessDenied, "org.liveupdate1.manage"):
        core.cancel(ALICE)


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.UPDATED])
def test_only_in_prepared_or_frozen(phase: Phase) -> None:
    core = in_phase(phase)
    with refused(core, WrongState, f"allowed in state frozen or prepared, not {phase.value}"):
        core.cancel(ROOT)
