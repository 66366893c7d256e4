"""Manager.Finish in the core (Orchestrator.finish): the admin's; state updated; every
session dropped with the fds not released yet, back to normal; the cycle ends finished,
or failed when fds were lost or corrupted; in flight until the backend let go."""

import pytest

from liveupdated.core.errors import AccessDenied, WrongState
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import CycleRecorded, FdLost, FdReleased, PhaseChanged, SessionDropped
from tests.core.steps import (
    ALICE,
    BOB,
    ROOT,
    VM,
    core_with,
    facts,
    finish,
    in_phase,
    refused,
    replayed,
    updated,
)


def test_every_session_goes_and_the_host_is_normal_again() -> None:
    core = core_with("ram", "rom")
    core.create_session(BOB, "1001-b")
    core.preserve_fd(BOB, "1001-b", "ram", [], facts())
    updated(core)
    core.fd_restored(VM, "ram")
    core.finish_session(ALICE, VM)
    records = core.finish(ROOT)
    why = "update finished"
    assert records[:-1] == [
        FdReleased(session=VM, token="ram", reason=why), SessionDropped(session=VM, reason=why),
        FdReleased(session="1001-b", token="ram", reason=why),
        SessionDropped(session="1001-b", reason=why),
    ]
    assert isinstance(records[-1], PhaseChanged)
    assert (records[-1].old, records[-1].new, records[-1].by_uid) == ("updated", "normal", 0)
    assert core.phase is Phase.NORMAL and core.sessions == {}
    assert (core.fd_count(), core.total_preserved_bytes(), core.uid_usage(1000)) == (0, 0, (0, 0))
    assert core.in_flight == "Finish"
    core.done("Finish")
    assert core.in_flight == ""
    [cycle] = [r.cycle for r in core.snapshot() if isinstance(r, CycleRecorded)]
    assert (cycle.outcome, cycle.fds_retrieved, cycle.ended_by) == ("finished", 1, 0)
    assert replayed(core.snapshot()).snapshot() == core.snapshot()  # Finish compacts


def test_a_cycle_that_lost_an_fd_ends_failed() -> None:
    core = in_phase(Phase.UPDATED, "ram")
    core.apply(FdLost(session=VM, token="ram"))  # what recovery records
    finish(core)
    assert [c.outcome for c in core.history] == ["failed"]


def test_the_admins() -> None:
    core = in_phase(Phase.UPDATED, "ram")
    with refused(core, AccessDenied, "org.liveupdate1.manage"):
        core.finish(ALICE)


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.PREPARED, Phase.FROZEN])
def test_only_in_updated(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    with refused(core, WrongState, f"Finish is allowed in state updated, not {phase.value}"):
        core.finish(ROOT)
