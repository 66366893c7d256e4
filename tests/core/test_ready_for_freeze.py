"""Session.ReadyForFreeze in the core (Orchestrator.ready_for_freeze): state prepared; the
session's owner or root; the session is no longer a laggard of Freeze's barrier. Ready
again records nothing; a Cancel or a new Prepare forgets it."""

import pytest

from liveupdated.core.errors import AccessDenied, NoSuchSession, WrongState
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import SessionReady
from tests.core.steps import (
    ALICE,
    BOB,
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


def test_a_ready_session_is_no_longer_waited_for() -> None:
    core = core_with()
    core.create_session(BOB, "1001-b")
    core.delay_freeze(ALICE, VM, True)
    core.delay_freeze(BOB, "1001-b", True)
    prepare(core)
    assert core.freeze_laggards() == ["1000-vm", "1001-b"]
    assert core.ready_for_freeze(BOB, "1001-b") == [SessionReady(session="1001-b")]
    assert core.freeze_laggards() == [VM]
    assert core.session_state(core.sessions["1001-b"]) == "ready"
    assert core.session_state(core.sessions[VM]) == "prepared"


def test_ready_again_records_nothing() -> None:
    core = in_phase(Phase.PREPARED)
    core.ready_for_freeze(ALICE, VM)
    assert core.ready_for_freeze(ROOT, VM) == []


def test_a_session_that_did_not_delay_may_say_it_too() -> None:
    core = in_phase(Phase.PREPARED)
    assert core.ready_for_freeze(ALICE, VM) == [SessionReady(session=VM)]


def test_a_cancel_or_a_new_prepare_forgets_it_and_replay_agrees() -> None:
    core = core_with()
    core.delay_freeze(ALICE, VM, True)
    log = core.snapshot()
    log += prepare(core)
    log += core.ready_for_freeze(ALICE, VM)
    assert replayed(log).sessions[VM].ready
    log += cancel(core)
    assert not core.sessions[VM].ready
    log += prepare(core)
    assert core.freeze_laggards() == [VM]
    assert replayed(log).snapshot() == core.snapshot()


def test_after_freeze_the_ready_mark_is_gone_from_the_state() -> None:
    core = in_phase(Phase.PREPARED)
    core.ready_for_freeze(ALICE, VM)
    freeze(core)
    assert core.session_state(core.sessions[VM]) == "frozen"


def test_another_uid_is_denied_and_an_unknown_session_named() -> None:
    core = in_phase(Phase.PREPARED)
    with refused(core, AccessDenied, "belongs to uid 1000"):
        core.ready_for_freeze(BOB, VM)
    with refused(core, NoSuchSession, "'1000-ghost'"):
        core.ready_for_freeze(ALICE, "1000-ghost")


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.FROZEN, Phase.UPDATED])
def test_only_in_prepared(phase: Phase) -> None:
    core = in_phase(phase)
    with refused(core, WrongState, f"allowed in state prepared, not {phase.value}"):
        core.ready_for_freeze(ALICE, VM)
