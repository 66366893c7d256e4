"""Session.DelayFreeze in the core (Orchestrator.delay_freeze): state normal; the
session's owner or root; with true, Freeze waits for the session's ReadyForFreeze. Asking
for what is already so records nothing."""

import pytest

from liveupdated.core.errors import AccessDenied, NoSuchSession, WrongState
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import FreezeDelaySet
from tests.core.steps import ALICE, BOB, ROOT, VM, core_with, in_phase, prepare, refused


def test_the_session_delays_freeze_until_it_is_ready() -> None:
    core = core_with()
    assert core.delay_freeze(ALICE, VM, True) == [FreezeDelaySet(session=VM, enabled=True)]
    assert core.sessions[VM].delay_freeze
    prepare(core)
    assert core.freeze_laggards() == [VM]


def test_false_takes_it_back() -> None:
    core = core_with()
    core.delay_freeze(ALICE, VM, True)
    assert core.delay_freeze(ROOT, VM, False) == [FreezeDelaySet(session=VM, enabled=False)]
    prepare(core)
    assert core.freeze_laggards() == []


def test_what_is_already_so_records_nothing() -> None:
    core = core_with()
    assert core.delay_freeze(ALICE, VM, False) == []
    core.delay_freeze(ALICE, VM, True)
    assert core.delay_freeze(ALICE, VM, True) == []


def test_another_uid_is_denied_and_an_unknown_session_named() -> None:
    core = core_with()
    with refused(core, AccessDenied, "belongs to uid 1000"):
        core.delay_freeze(BOB, VM, True)
    with refused(core, NoSuchSession, "'1000-ghost'"):
        core.delay_freeze(ALICE, "1000-ghost", True)


@pytest.mark.parametrize("phase", [Phase.PREPARED, Phase.FROZEN, Phase.UPDATED])
def test_only_in_normal(phase: Phase) -> None:
    core = in_phase(phase)
    with refused(core, WrongState, f"DelayFreeze is allowed in state normal, not {phase.value}"):
        core.delay_freeze(ALICE, VM, True)
