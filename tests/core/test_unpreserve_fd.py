"""Session.UnpreserveFd in the core (Orchestrator.unpreserve_fd): state normal; the
session's owner or root; a token no other fd of the session requires; its budget comes
back and the token may be preserved again."""

import pytest

from liveupdated.core.errors import (
    AccessDenied,
    DependencyMissing,
    InvalidArgument,
    NoSuchSession,
    NoSuchToken,
    WrongState,
)
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import FdCorrupted, FdReleased
from tests.core.steps import ALICE, BOB, PAGE, ROOT, VM, core_with, facts, in_phase, refused


def test_the_fd_is_released_and_its_budget_comes_back() -> None:
    core = core_with("ram", "rom")
    assert core.unpreserve_fd(ALICE, VM, "ram") == [
        FdReleased(session=VM, token="ram", reason="unpreserved")]
    assert list(core.sessions[VM].fds) == ["rom"]
    assert (core.fd_count(), core.total_preserved_bytes(), core.uid_usage(1000)) == (
        1, PAGE, (1, PAGE))
    core.preserve_fd(ALICE, VM, "ram", [], facts())  # the token is free again


def test_a_required_token_is_refused_naming_every_dependent() -> None:
    core = core_with("ram")
    core.preserve_fd(ALICE, VM, "kvm", ["ram"], facts())
    core.preserve_fd(ALICE, VM, "dev", ["ram"], facts())
    with refused(core, DependencyMissing, "'ram' is required by dev, kvm .* unpreserve those"):
        core.unpreserve_fd(ALICE, VM, "ram")
    core.unpreserve_fd(ALICE, VM, "kvm")
    core.unpreserve_fd(ALICE, VM, "dev")
    core.unpreserve_fd(ALICE, VM, "ram")
    assert core.sessions[VM].fds == {}


def test_an_unknown_token_is_named() -> None:
    core = core_with("ram")
    with refused(core, NoSuchToken, f"session '{VM}' has no token 'rom'"):
        core.unpreserve_fd(ALICE, VM, "rom")


def test_an_invalid_token_is_invalid() -> None:
    core = core_with("ram")
    with refused(core, InvalidArgument):
        core.unpreserve_fd(ALICE, VM, "r/m")


def test_only_the_owner_or_root() -> None:
    core = core_with("ram", "rom")
    with refused(core, AccessDenied, "belongs to uid 1000"):
        core.unpreserve_fd(BOB, VM, "ram")
    core.unpreserve_fd(ROOT, VM, "ram")


def test_an_unknown_session_is_named() -> None:
    core = core_with("ram")
    with refused(core, NoSuchSession, "'1000-ghost'"):
        core.unpreserve_fd(ALICE, "1000-ghost", "ram")


@pytest.mark.parametrize("phase", [Phase.PREPARED, Phase.FROZEN, Phase.UPDATED])
def test_only_in_normal(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    with refused(core, WrongState, f"allowed in state normal, not {phase.value}"):
        core.unpreserve_fd(ALICE, VM, "ram")


def test_a_corrupted_fd_may_be_given_up() -> None:
    core = core_with()
    core.apply(FdCorrupted(session=VM, token="ram", size=PAGE))  # what recovery records
    core.unpreserve_fd(ALICE, VM, "ram")
    assert core.sessions[VM].fds == {} and core.fd_count() == 0
