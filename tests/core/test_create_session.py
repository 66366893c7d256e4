"""Manager.CreateSession in the core (Orchestrator.create_session): state normal, anyone;
a non-admin's names start with its uid; one name one session; the host's and each uid's
session limits. (A name held by quarantined fds: the quarantine's tests.)"""

import pytest

from liveupdated.core.errors import InvalidArgument, QuotaExceeded, SessionExists, WrongState
from liveupdated.core.orchestrator import Caller, Limits, Phase
from liveupdated.core.records import SessionCreated
from tests.core.steps import ALICE, BOB, ROOT, VM, core_with, in_phase, new_core, refused, replayed


def test_a_session_is_owned_by_the_callers_uid_unit_and_connection() -> None:
    core = new_core()
    records = core.create_session(ALICE, VM)
    assert records == [SessionCreated(session=VM, uid=1000, unit="vmm@a.service", client=":1.2")]
    session = core.sessions[VM]
    assert (session.uid, session.unit, session.client, session.fds) == (
        1000, "vmm@a.service", ":1.2", {})
    assert core.session_state(session) == "open"
    assert replayed(records).snapshot() == core.snapshot()


@pytest.mark.parametrize("bad", ["", "a" * 64, "has space", "colon:", "slash/", "ünï"])
def test_a_name_outside_the_rule_is_invalid(bad: str) -> None:
    core = new_core()
    with refused(core, InvalidArgument, r"A-Za-z0-9_\.-"):
        core.create_session(ROOT, bad)


def test_a_name_of_63_characters_is_the_longest() -> None:
    core = new_core()
    core.create_session(ALICE, "1000-" + "a" * 58)
    with refused(core, InvalidArgument):
        core.create_session(ALICE, "1000-" + "a" * 59)


@pytest.mark.parametrize("bad", ["vm", "1001-vm", "1000vm", "0-vm", "10000-vm"])
def test_a_non_admins_names_start_with_its_uid(bad: str) -> None:
    core = new_core()
    with refused(core, InvalidArgument, r"uid 1000 must be named '1000-<name>'"):
        core.create_session(ALICE, bad)


def test_an_admin_names_freely_another_uids_prefix_included() -> None:
    core = new_core()
    polkit_admin = Caller(uid=1002, unit="", client=":1.9", admin=True)
    for caller, name in [(ROOT, "vm"), (ROOT, "1001-vm"), (polkit_admin, "free")]:
        core.create_session(caller, name)
    assert {n: s.uid for n, s in core.sessions.items()} == {
        "vm": 0, "1001-vm": 0, "free": 1002}


def test_a_name_in_use_is_refused_even_to_root() -> None:
    core = core_with("ram")
    with refused(core, SessionExists, "already exists"):
        core.create_session(ROOT, VM)
    with refused(core, SessionExists):
        core.create_session(ALICE, VM)


@pytest.mark.parametrize("phase", [Phase.PREPARED, Phase.FROZEN, Phase.UPDATED])
def test_only_in_normal(phase: Phase) -> None:
    core = in_phase(phase)
    with refused(core, WrongState, f"allowed in state normal, not {phase.value}"):
        core.create_session(ALICE, "1000-new")


def test_a_bad_name_is_invalid_before_the_state_is_asked() -> None:
    core = in_phase(Phase.PREPARED)
    with refused(core, InvalidArgument):
        core.create_session(ALICE, "vm")


def test_the_hosts_session_limit_binds_everyone() -> None:
    core = new_core(Limits(max_sessions=2))
    core.create_session(ALICE, "1000-a")
    core.create_session(BOB, "1001-b")
    with refused(core, QuotaExceeded, "the host holds the maximum of 2 sessions"):
        core.create_session(ROOT, "r")


def test_each_uid_but_root_has_its_own_session_limit() -> None:
    core = new_core(Limits(max_sessions_per_uid=1))
    core.create_session(ALICE, "1000-a")
    with refused(core, QuotaExceeded, "uid 1000 already has the maximum of 1 sessions"):
        core.create_session(ALICE, "1000-b")
    core.create_session(BOB, "1001-b")  # another uid: its own count
    core.create_session(ROOT, "r1")  # root: the host's limit only
    core.create_session(ROOT, "r2")
    assert sorted(core.sessions) == ["1000-a", "1001-b", "r1", "r2"]


def test_a_session_closed_frees_its_name_and_its_place() -> None:
    core = new_core(Limits(max_sessions=1))
    core.create_session(ALICE, VM)
    core.close_session(ALICE, VM)
    core.create_session(ALICE, VM)
    assert list(core.sessions) == [VM]
