"""Session.Finish in the core (Orchestrator.finish_session): state updated; the session's
owner or root; the fds it did not retrieve are released, the restored ones kept until
Manager.Finish; once finished, it hands nothing out. Finished again records nothing."""

import pytest

from liveupdated.core.errors import AccessDenied, NoSuchSession, WrongState
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import FdReleased, SessionFinished
from tests.core.steps import (
    ALICE,
    BOB,
    PAGE,
    ROOT,
    VM,
    core_with,
    facts,
    in_phase,
    refused,
    updated,
)


def test_the_fds_not_retrieved_are_released_and_the_session_finished() -> None:
    core = in_phase(Phase.UPDATED, "ram", "disk", "rom")
    core.fd_restored(VM, "ram")
    assert core.finish_session(ALICE, VM) == [
        FdReleased(session=VM, token="disk", reason="finished"),
        FdReleased(session=VM, token="rom", reason="finished"),
        SessionFinished(session=VM),
    ]
    assert list(core.sessions[VM].fds) == ["ram"]
    assert (core.fd_count(), core.total_preserved_bytes()) == (1, PAGE)
    assert core.session_state(core.sessions[VM]) == "finished"
    assert core.phase is Phase.UPDATED  # the host's Finish is the admin's


def test_finished_again_records_nothing() -> None:
    core = in_phase(Phase.UPDATED, "ram")
    core.finish_session(ALICE, VM)
    assert core.finish_session(ROOT, VM) == []


def test_other_sessions_keep_their_fds() -> None:
    core = core_with("ram")
    core.create_session(BOB, "1001-b")
    core.preserve_fd(BOB, "1001-b", "ram", [], facts())
    updated(core)
    core.finish_session(ALICE, VM)
    assert list(core.sessions["1001-b"].fds) == ["ram"]
    core.check_retrieve_fd(BOB, "1001-b", "ram")


def test_another_uid_is_denied_and_an_unknown_session_named() -> None:
    core = in_phase(Phase.UPDATED, "ram")
    with refused(core, AccessDenied, "belongs to uid 1000"):
        core.finish_session(BOB, VM)
    with refused(core, NoSuchSession, "'1000-ghost'"):
        core.finish_session(ALICE, "1000-ghost")


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.PREPARED, Phase.FROZEN])
def test_only_in_updated(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    with refused(core, WrongState, f"Session.Finish is allowed in state updated, not {phase}"):
        core.finish_session(ALICE, VM)
