"""Session.RetrieveFd in the core (Orchestrator.check_retrieve_fd, and fd_restored once
an fd is restored after the reboot): states normal and updated; the session's owner or
root; not after Session.Finish; a lost fd is NoSuchToken, a corrupted one Corrupted. The
check decides nothing: it records nothing."""

import pytest

from liveupdated.core.errors import (
    AccessDenied,
    Corrupted,
    InvalidArgument,
    NoSuchSession,
    NoSuchToken,
    WrongState,
)
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import FdCorrupted, FdLost, FdRestored
from tests.core.steps import ALICE, BOB, PAGE, ROOT, VM, in_phase, refused, replayed, seen


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.UPDATED])
def test_the_owner_and_root_get_the_entry_and_nothing_changes(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    before = seen(core)
    for caller in (ALICE, ROOT):
        entry = core.check_retrieve_fd(caller, VM, "ram")
        assert (entry.token, entry.size, entry.name) == ("ram", PAGE, "ram")
    assert seen(core) == before


@pytest.mark.parametrize("phase", [Phase.PREPARED, Phase.FROZEN])
def test_not_while_the_update_is_under_way(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    with refused(core, WrongState, f"allowed in state normal or updated, not {phase.value}"):
        core.check_retrieve_fd(ALICE, VM, "ram")


def test_a_restored_fd_is_recorded_with_its_time_and_counted_in_the_cycle() -> None:
    core = in_phase(Phase.UPDATED, "ram", "rom")
    [record] = core.fd_restored(VM, "ram")
    assert isinstance(record, FdRestored) and (record.session, record.token) == (VM, "ram")
    assert record.at_usec > 0
    assert core.sessions[VM].fds["ram"].restored
    assert not core.sessions[VM].fds["rom"].restored
    assert core.cycle is not None
    assert (core.cycle.fds_retrieved, core.cycle.first_fd_usec, core.cycle.last_fd_usec) == (
        1, record.at_usec, record.at_usec)
    core.check_retrieve_fd(ALICE, VM, "ram")  # and asked again: the same fd


def test_not_after_its_session_finished() -> None:
    core = in_phase(Phase.UPDATED, "ram")
    core.finish_session(ALICE, VM)
    with refused(core, WrongState, f"session '{VM}' is finished; its fds were released"):
        core.check_retrieve_fd(ALICE, VM, "ram")


def test_a_lost_fd_is_no_such_token_saying_so() -> None:
    core = in_phase(Phase.NORMAL, "ram")
    core.apply(FdLost(session=VM, token="ram"))  # what recovery records
    with refused(core, NoSuchToken, "was lost in a daemon restart"):
        core.check_retrieve_fd(ALICE, VM, "ram")


@pytest.mark.parametrize(("phase", "remedy"), [
    (Phase.NORMAL, "UnpreserveFd it and preserve it again"),
    (Phase.UPDATED, "Session.Finish releases it"),
])
def test_a_corrupted_fd_is_never_handed_out(phase: Phase, remedy: str) -> None:
    core = in_phase(phase)
    core.apply(FdCorrupted(session=VM, token="ram", size=PAGE))  # what recovery records
    with refused(core, Corrupted, f"failed its checksum; .*never handed out: {remedy}"):
        core.check_retrieve_fd(ALICE, VM, "ram")


def test_another_uid_is_denied() -> None:
    core = in_phase(Phase.NORMAL, "ram")
    with refused(core, AccessDenied, "belongs to uid 1000"):
        core.check_retrieve_fd(BOB, VM, "ram")


def test_unknown_or_invalid_names() -> None:
    core = in_phase(Phase.NORMAL, "ram")
    with refused(core, NoSuchToken, "has no token 'rom'"):
        core.check_retrieve_fd(ALICE, VM, "rom")
    with refused(core, NoSuchSession, "'1000-ghost'"):
        core.check_retrieve_fd(ALICE, "1000-ghost", "ram")
    with refused(core, InvalidArgument):
        core.check_retrieve_fd(ALICE, VM, "r m")


def test_a_compaction_after_a_restore_keeps_the_cycle_as_it_was() -> None:
    core = in_phase(Phase.UPDATED, "ram", "rom")
    core.fd_restored(VM, "ram")
    assert replayed(core.snapshot()).cycle == core.cycle
