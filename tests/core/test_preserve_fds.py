"""Session.PreserveFds in the core (Orchestrator.preserve_fds): PreserveFd's rules for up
to 16 fds in one call, all preserved or none; requirements may name tokens of the same
call; the limits count the whole call."""

from liveupdated.core.errors import InvalidArgument, QuotaExceeded, TokenExists
from liveupdated.core.orchestrator import FdFacts, Limits
from liveupdated.core.records import FdPreserved
from tests.core.steps import ALICE, PAGE, VM, core_with, facts, refused

Fd = tuple[str, list[str], FdFacts]


def batch(*tokens: str, requires: list[str] | None = None) -> list[Fd]:
    return [(token, list(requires or []), facts()) for token in tokens]


def test_every_fd_of_the_call_is_held_in_the_order_given() -> None:
    core = core_with()
    records = core.preserve_fds(ALICE, VM, [("rom", ["ram"], facts()), ("ram", [], facts())],
                                "PreserveFds")
    assert [(r.token, r.requires) for r in records if isinstance(r, FdPreserved)] == [
        ("rom", ("ram",)), ("ram", ())]
    assert list(core.sessions[VM].fds) == ["rom", "ram"]
    assert core.missing_dependencies() == []  # the requirement came in the same call


def test_at_most_16_fds_a_call() -> None:
    core = core_with()
    with refused(core, InvalidArgument, "PreserveFds takes at most 16 fds a call, not 17"):
        core.preserve_fds(ALICE, VM, batch(*(f"t{i}" for i in range(17))), "PreserveFds")
    core.preserve_fds(ALICE, VM, batch(*(f"t{i}" for i in range(16))), "PreserveFds")
    assert core.fd_count() == 16


def test_a_token_named_twice_in_one_call_is_invalid() -> None:
    core = core_with()
    with refused(core, InvalidArgument, "names token 'ram' twice; one fd per token"):
        core.preserve_fds(ALICE, VM, batch("ram", "rom", "ram"), "PreserveFds")


def test_one_fd_at_fault_refuses_the_whole_call_naming_it() -> None:
    core = core_with("held")
    with refused(core, TokenExists, "token 'held'"):
        core.preserve_fds(ALICE, VM, batch("a", "held", "b"), "PreserveFds")
    with refused(core, InvalidArgument, "'b'"):
        core.preserve_fds(ALICE, VM, [*batch("a"), ("b", ["b"], facts())], "PreserveFds")
    assert list(core.sessions[VM].fds) == ["held"]


def test_a_cycle_through_the_calls_own_fds_is_refused() -> None:
    core = core_with()
    with refused(core, InvalidArgument, "cycle: a -> b -> a"):
        core.preserve_fds(ALICE, VM, [("a", ["b"], facts()), ("b", ["a"], facts())],
                          "PreserveFds")


def test_the_sessions_fd_limit_counts_the_whole_call() -> None:
    core = core_with("a", limits=Limits(max_fds_per_session=3))
    with refused(core, QuotaExceeded, "holds 1 fds; 3 more would pass the maximum of 3 fds"):
        core.preserve_fds(ALICE, VM, batch("b", "c", "d"), "PreserveFds")
    core.preserve_fds(ALICE, VM, batch("b", "c"), "PreserveFds")


def test_the_uids_fd_limit_counts_the_whole_call() -> None:
    core = core_with("a", limits=Limits(max_fds_per_uid=2))
    with refused(core, QuotaExceeded, "uid 1000 holds 1 fds; 2 more would pass"):
        core.preserve_fds(ALICE, VM, batch("b", "c"), "PreserveFds")


def test_the_byte_budget_counts_the_sum_of_the_call() -> None:
    core = core_with(limits=Limits(max_preserved_bytes=12 * PAGE))  # 3 pages a uid
    with refused(core, QuotaExceeded, "uid 1000 holds 0 bytes; 16384 more would pass"):
        core.preserve_fds(ALICE, VM, batch("a", "b", "c", "d"), "PreserveFds")
    core.preserve_fds(ALICE, VM, batch("a", "b", "c"), "PreserveFds")
