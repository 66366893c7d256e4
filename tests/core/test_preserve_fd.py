"""Session.PreserveFd in the core (Orchestrator.preserve_fd, whose checks without the fd
are check_preserve_all): state normal; the session's owner or root; tokens and requires
are names, at most 32 requires, none twice, no cycle; a token once per session; the
session's, the owner uid's and the host's fd and byte budgets."""

import pytest

from liveupdated.core.errors import (
    AccessDenied,
    InvalidArgument,
    NoSuchSession,
    QuotaExceeded,
    TokenExists,
    WrongState,
)
from liveupdated.core.orchestrator import Limits, Phase
from liveupdated.core.records import FdPreserved
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
    replayed,
)


def test_an_fd_is_held_under_its_token_with_what_was_learned_of_it() -> None:
    core = core_with()
    records = core.preserve_fd(ALICE, VM, "rom", ["ram"], facts(8192, "rom-name"))
    assert records == [FdPreserved(session=VM, token="rom", kind="memfd", requires=("ram",),
                                   size=8192, name="rom-name", seals=0)]
    entry = core.sessions[VM].fds["rom"]
    assert (entry.requires, entry.size, entry.name, entry.problem) == (
        ("ram",), 8192, "rom-name", "")
    assert (core.fd_count(), core.total_preserved_bytes(), core.uid_usage(1000)) == (
        1, 8192, (1, 8192))
    assert core.sessions[VM].preserved_bytes == 8192


def test_a_requirement_not_held_yet_is_accepted_freeze_checks_it() -> None:
    core = core_with()
    core.preserve_fd(ALICE, VM, "kvm", ["ram", "vfio"], facts())
    assert core.missing_dependencies() == [
        f"{VM}/ram (required by kvm)", f"{VM}/vfio (required by kvm)"]


def test_the_records_replay_to_the_same_state() -> None:
    core = core_with()
    log = core.snapshot()
    log += core.preserve_fd(ALICE, VM, "ram", [], facts())
    log += core.preserve_fd(ALICE, VM, "kvm", ["ram"], facts(0))
    assert replayed(log).snapshot() == core.snapshot()


@pytest.mark.parametrize(("token", "requires"), [
    ("bad token", []), ("", []), ("a" * 64, []), ("kvm", ["bad/one"]), ("kvm", [""]),
])
def test_tokens_and_requires_are_names(token: str, requires: list[str]) -> None:
    core = core_with("ram")
    with refused(core, InvalidArgument, r"A-Za-z0-9_\.-"):
        core.preserve_fd(ALICE, VM, token, requires, facts())


def test_at_most_32_requires() -> None:
    core = core_with()
    many = [f"t{i}" for i in range(33)]
    with refused(core, InvalidArgument, "names 33 tokens; at most 32"):
        core.preserve_fd(ALICE, VM, "kvm", many, facts())
    core.preserve_fd(ALICE, VM, "kvm", many[:32], facts())


def test_a_requirement_named_twice_is_invalid() -> None:
    core = core_with("ram")
    with refused(core, InvalidArgument, "lists a token twice"):
        core.preserve_fd(ALICE, VM, "kvm", ["ram", "ram"], facts())


@pytest.mark.parametrize(("held", "token", "requires", "path"), [
    ([], "a", ["a"], "a -> a"),
    ([("a", ["b"])], "b", ["a"], "b -> a -> b"),
    ([("a", ["c"]), ("b", ["a"])], "c", ["b"], "c -> b -> a -> c"),
])
def test_a_dependency_cycle_is_refused_naming_it(
    held: list[tuple[str, list[str]]], token: str, requires: list[str], path: str
) -> None:
    core = core_with()
    for t, r in held:
        core.preserve_fd(ALICE, VM, t, r, facts())
    with refused(core, InvalidArgument, f"would close a dependency cycle: {path}"):
        core.preserve_fd(ALICE, VM, token, requires, facts())


def test_a_token_is_held_once_per_session() -> None:
    core = core_with("ram")
    with refused(core, TokenExists, "already holds token 'ram'; UnpreserveFd it first"):
        core.preserve_fd(ALICE, VM, "ram", [], facts())
    core.create_session(ALICE, "1000-two")
    core.preserve_fd(ALICE, "1000-two", "ram", [], facts())  # another session: its own


def test_only_the_owner_or_root() -> None:
    core = core_with("ram")
    with refused(core, AccessDenied, "belongs to uid 1000; only it or root"):
        core.preserve_fd(BOB, VM, "x", [], facts())
    core.preserve_fd(ROOT, VM, "by-root", [], facts())
    assert core.uid_usage(1000) == (2, 2 * PAGE)  # root spent the owner's budget


def test_an_unknown_session_is_named() -> None:
    core = core_with()
    with refused(core, NoSuchSession, "'1000-ghost'"):
        core.preserve_fd(ALICE, "1000-ghost", "ram", [], facts())


@pytest.mark.parametrize("phase", [Phase.PREPARED, Phase.FROZEN, Phase.UPDATED])
def test_only_in_normal(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    with refused(core, WrongState, f"PreserveFd is allowed in state normal, not {phase.value}"):
        core.preserve_fd(ALICE, VM, "more", [], facts())


def test_the_sessions_fd_limit() -> None:
    core = core_with("a", limits=Limits(max_fds_per_session=1))
    with refused(core, QuotaExceeded, f"session '{VM}' holds the maximum of 1 fds"):
        core.preserve_fd(ALICE, VM, "b", [], facts())


def test_the_owner_uids_fd_limit_counts_all_its_sessions_and_not_roots() -> None:
    core = core_with("a", "b", limits=Limits(max_fds_per_uid=2))
    core.create_session(ALICE, "1000-two")
    with refused(core, QuotaExceeded, "uid 1000 holds 2 fds; 1 more would pass its limit"):
        core.preserve_fd(ALICE, "1000-two", "c", [], facts())
    with refused(core, QuotaExceeded, "uid 1000 holds 2 fds"):
        core.preserve_fd(ROOT, "1000-two", "c", [], facts())  # the owner's budget
    core.create_session(ROOT, "vm-root")
    for token in "cde":
        core.preserve_fd(ROOT, "vm-root", token, [], facts())
    assert core.uid_usage(0) == (3, 3 * PAGE)


def test_the_owner_uids_byte_limit_is_a_quarter_of_the_hosts_by_default() -> None:
    core = core_with("a", "b", limits=Limits(max_preserved_bytes=8 * PAGE))
    with refused(core, QuotaExceeded,
                 "uid 1000 holds 8192 bytes; 4096 more would pass its limit of 8192"):
        core.preserve_fd(ALICE, VM, "c", [], facts())
    core.preserve_fd(ALICE, VM, "c", [], facts(0))  # an empty memfd costs no bytes


def test_the_hosts_byte_limit_tells_a_tenant_only_its_own_figures() -> None:
    core = core_with("a", limits=Limits(max_preserved_bytes=6000, max_bytes_per_uid=10_000))
    with refused(core, QuotaExceeded, "no room for 4096 more") as refusal:
        core.preserve_fd(ALICE, VM, "b", [], facts())
    assert "6000" not in str(refusal.value)
    with refused(core, QuotaExceeded, "limit of 6000 bytes"):
        core.preserve_fd(ROOT, VM, "b", [], facts())
