"""Manager.DropSession in the core (Orchestrator.drop_session): the admin's; states normal
and prepared, also while a Freeze waits on its barrier (to unblock it); the session and
every fd of it go, the record saying who dropped it and why."""

import pytest

from liveupdated.core.errors import AccessDenied, InvalidArgument, NoSuchSession, WrongState
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import FdReleased, SessionDropped
from tests.core.steps import (
    ALICE,
    ROOT,
    VM,
    core_with,
    freeze,
    in_phase,
    prepare,
    refused,
    sizes_now,
)


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.PREPARED])
def test_the_session_and_its_fds_go_saying_who_and_why(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    why = "dropped by uid 0: blocks Freeze"
    assert core.drop_session(ROOT, VM, "blocks Freeze") == [
        FdReleased(session=VM, token="ram", reason=why), SessionDropped(session=VM, reason=why)]
    assert core.sessions == {} and core.fd_count() == 0
    assert core.phase is phase


def test_an_empty_reason_says_who() -> None:
    core = core_with()
    [dropped] = core.drop_session(ROOT, VM, "")
    assert dropped == SessionDropped(session=VM, reason="dropped by uid 0")


def test_it_is_the_admins_even_for_the_sessions_owner() -> None:
    core = core_with("ram")
    with refused(core, AccessDenied, "allows org.liveupdate1.drop-session"):
        core.drop_session(ALICE, VM, "mine")
    with refused(core, AccessDenied):  # asked before the arguments
        core.drop_session(ALICE, "bad/name", "")


@pytest.mark.parametrize(("name", "reason"), [
    ("bad/name", ""), (VM, "x" * 201), (VM, "line\nbreak"),
])
def test_names_and_reasons_are_checked(name: str, reason: str) -> None:
    core = core_with("ram")
    with refused(core, InvalidArgument):
        core.drop_session(ROOT, name, reason)
    core.drop_session(ROOT, VM, "x" * 200)


def test_an_unknown_session_is_named() -> None:
    core = core_with()
    with refused(core, NoSuchSession, "'ghost'"):
        core.drop_session(ROOT, "ghost", "")


@pytest.mark.parametrize("phase", [Phase.FROZEN, Phase.UPDATED])
def test_not_once_frozen(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    with refused(core, WrongState, f"allowed in state normal or prepared, not {phase.value}"):
        core.drop_session(ROOT, VM, "")


def test_it_unblocks_a_waiting_freeze() -> None:
    core = core_with("ram")
    core.delay_freeze(ALICE, VM, True)
    prepare(core)
    attempt = core.begin_freeze(ROOT)
    assert core.freeze_laggards() == [VM]
    core.drop_session(ROOT, VM, "never ready")
    assert core.freeze_laggards() == []
    core.freeze(ROOT, sizes_now(core), attempt)
    core.done("Freeze", attempt)
    assert core.phase is Phase.FROZEN


def test_not_while_another_host_command_is_under_way() -> None:
    core = core_with("ram")
    core.prepare(ROOT)  # its backend work not done yet
    with refused(core, WrongState, "DropSession is not possible while Prepare is under way"):
        core.drop_session(ROOT, VM, "")
    core.done("Prepare")
    freeze(core)
