"""Manager.Prepare in the core (Orchestrator.prepare): the admin's; state normal; to
prepared, recording when and by whom, starting an update cycle; in flight until its
backend work is done (every other host command refused meanwhile)."""

import pytest

from liveupdated.core.errors import AccessDenied, WrongState
from liveupdated.core.orchestrator import Caller, Phase
from liveupdated.core.records import PhaseChanged
from tests.core.steps import ALICE, ROOT, VM, core_with, in_phase, refused, replayed


def test_to_prepared_recorded_with_when_and_who() -> None:
    core = core_with("ram")
    polkit_admin = Caller(uid=1002, unit="", client=":1.9", admin=True)
    [record] = core.prepare(polkit_admin)
    assert isinstance(record, PhaseChanged)
    assert (record.old, record.new, record.by_uid) == ("normal", "prepared", 1002)
    assert record.at_usec > 0
    assert core.phase is Phase.PREPARED
    assert core.session_state(core.sessions[VM]) == "prepared"
    assert core.cycle is not None
    assert (core.cycle.started_usec, core.cycle.prepared_by, core.cycle.outcome) == (
        record.at_usec, 1002, "in progress")
    assert replayed([*core_with("ram").snapshot(), record]).snapshot() == core.snapshot()


def test_in_flight_until_done() -> None:
    core = core_with()
    core.prepare(ROOT)
    assert core.in_flight == "Prepare"
    with refused(core, WrongState, "Cancel is not possible while Prepare is under way"):
        core.cancel(ROOT)
    core.done("Prepare")
    assert core.in_flight == ""
    core.cancel(ROOT)


def test_the_admins() -> None:
    core = core_with()
    with refused(core, AccessDenied, "root, or a user that polkit allows org.liveupdate1.manage"):
        core.prepare(ALICE)


@pytest.mark.parametrize("phase", [Phase.PREPARED, Phase.FROZEN, Phase.UPDATED])
def test_only_in_normal(phase: Phase) -> None:
    core = in_phase(phase)
    with refused(core, WrongState, f"Prepare is allowed in state normal, not {phase.value}"):
        core.prepare(ROOT)
