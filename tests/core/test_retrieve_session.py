"""Manager.RetrieveSession in the core (Orchestrator.retrieve_session): state updated;
the session's owner or root; it decides nothing, so it records nothing."""

import pytest

from liveupdated.core.errors import AccessDenied, InvalidArgument, NoSuchSession, WrongState
from liveupdated.core.orchestrator import Phase
from tests.core.steps import ALICE, BOB, ROOT, VM, in_phase, refused, seen


def test_the_owner_and_root_get_the_session_carried_over() -> None:
    core = in_phase(Phase.UPDATED, "ram")
    before = seen(core)
    for caller in (ALICE, ROOT):
        session = core.retrieve_session(caller, VM)
        assert (session.name, session.uid, list(session.fds)) == (VM, 1000, ["ram"])
    assert seen(core) == before
    assert core.session_state(core.sessions[VM]) == "incoming"


def test_another_uid_is_denied() -> None:
    core = in_phase(Phase.UPDATED, "ram")
    with refused(core, AccessDenied, "belongs to uid 1000"):
        core.retrieve_session(BOB, VM)


def test_an_unknown_session_is_named() -> None:
    core = in_phase(Phase.UPDATED)
    with refused(core, NoSuchSession, "'1000-other'"):
        core.retrieve_session(ALICE, "1000-other")


def test_an_invalid_name_is_invalid() -> None:
    core = in_phase(Phase.UPDATED)
    with refused(core, InvalidArgument):
        core.retrieve_session(ALICE, "no/such")


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.PREPARED, Phase.FROZEN])
def test_only_in_updated(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    with refused(core, WrongState, f"allowed in state updated, not {phase.value}"):
        core.retrieve_session(ALICE, VM)
