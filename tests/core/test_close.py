"""Session.Close in the core (Orchestrator.close_session): state normal; the session's
owner or root; every fd of the session released, the session dropped, its name, its place
and its budget free again."""

import pytest

from liveupdated.core.errors import AccessDenied, NoSuchSession, WrongState
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import FdReleased, SessionDropped
from tests.core.steps import ALICE, BOB, PAGE, ROOT, VM, core_with, facts, in_phase, refused


def test_every_fd_is_released_and_the_session_dropped() -> None:
    core = core_with("ram", "rom")
    core.create_session(BOB, "1001-b")
    core.preserve_fd(BOB, "1001-b", "ram", [], facts())
    assert core.close_session(ALICE, VM) == [
        FdReleased(session=VM, token="ram", reason="closed"),
        FdReleased(session=VM, token="rom", reason="closed"),
        SessionDropped(session=VM, reason="closed"),
    ]
    assert list(core.sessions) == ["1001-b"]
    assert (core.fd_count(), core.total_preserved_bytes()) == (1, PAGE)
    assert core.uid_usage(1000) == (0, 0)
    core.create_session(ALICE, VM)  # the name is free again


def test_root_may_close_any_session_another_uid_may_not() -> None:
    core = core_with("ram")
    with refused(core, AccessDenied, "belongs to uid 1000"):
        core.close_session(BOB, VM)
    core.close_session(ROOT, VM)
    assert core.sessions == {}


def test_an_unknown_session_is_named() -> None:
    core = core_with()
    with refused(core, NoSuchSession, "'1000-ghost'"):
        core.close_session(ALICE, "1000-ghost")


@pytest.mark.parametrize("phase", [Phase.PREPARED, Phase.FROZEN, Phase.UPDATED])
def test_only_in_normal(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    with refused(core, WrongState, f"Close is allowed in state normal, not {phase.value}"):
        core.close_session(ALICE, VM)
