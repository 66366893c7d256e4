"""Session.RetrieveFds in the core (Orchestrator.check_retrieve_fds): RetrieveFd's rules
for up to 16 tokens, each named once; every entry in the order asked, or the error of
the first token at fault, naming it."""

from liveupdated.core.errors import AccessDenied, Corrupted, InvalidArgument, NoSuchToken
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import FdCorrupted
from tests.core.steps import ALICE, BOB, PAGE, VM, in_phase, refused, seen


def test_every_entry_in_the_order_asked() -> None:
    core = in_phase(Phase.UPDATED, "ram", "disk", "rom")
    before = seen(core)
    entries = core.check_retrieve_fds(ALICE, VM, ["rom", "ram", "disk"], "RetrieveFds")
    assert [e.token for e in entries] == ["rom", "ram", "disk"]
    assert seen(core) == before


def test_at_most_16_tokens_a_call() -> None:
    core = in_phase(Phase.NORMAL, "ram")
    with refused(core, InvalidArgument, "RetrieveFds takes at most 16 tokens a call, not 17"):
        core.check_retrieve_fds(ALICE, VM, [f"t{i}" for i in range(17)], "RetrieveFds")


def test_a_token_named_twice_is_invalid_before_any_is_looked_up() -> None:
    core = in_phase(Phase.NORMAL, "ram")
    with refused(core, InvalidArgument, "RetrieveFds names token 'nope' twice"):
        core.check_retrieve_fds(ALICE, VM, ["nope", "ram", "nope"], "RetrieveFds")


def test_the_token_at_fault_is_named() -> None:
    core = in_phase(Phase.NORMAL, "ram")
    core.apply(FdCorrupted(session=VM, token="bad", size=PAGE))
    with refused(core, NoSuchToken, "'rom'"):
        core.check_retrieve_fds(ALICE, VM, ["ram", "rom"], "RetrieveFds")
    with refused(core, Corrupted, f"{VM}/bad"):
        core.check_retrieve_fds(ALICE, VM, ["ram", "bad"], "RetrieveFds")


def test_another_uid_is_denied() -> None:
    core = in_phase(Phase.NORMAL, "ram")
    with refused(core, AccessDenied):
        core.check_retrieve_fds(BOB, VM, ["ram"], "RetrieveFds")
