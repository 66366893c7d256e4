"""Host commands never overlap (Orchestrator.done, and every host command's check): while
one's effects are under way (Prepare's backend work, Freeze waiting on its barrier, Cancel
and Finish cleaning up, Reboot writing the handover) another is WrongState naming it; only
Cancel and DropSession may come while a Freeze waits. A command is under way from its
decision until the service calls done (reboot_failed or rebooted for Reboot)."""

from collections.abc import Callable

import pytest

from liveupdated.core.errors import WrongState
from liveupdated.core.orchestrator import Orchestrator, Phase
from tests.core.steps import ROOT, VM, in_phase, refused

Command = Callable[[Orchestrator], object]

# Each host command, asked as the service first asks it (Freeze: before its barrier).
ASK: dict[str, Command] = {
    "Prepare": lambda core: core.prepare(ROOT),
    "Freeze": lambda core: core.begin_freeze(ROOT),
    "Cancel": lambda core: core.cancel(ROOT),
    "Finish": lambda core: core.finish(ROOT),
    "Reboot": lambda core: core.begin_reboot(ROOT, "old-boot"),
    "DropSession": lambda core: core.drop_session(ROOT, VM, ""),
}


def under_way(command: str) -> Orchestrator:
    """A core whose `command` was decided and whose effects are not done."""
    before = {"Prepare": Phase.NORMAL, "Freeze": Phase.PREPARED, "Cancel": Phase.PREPARED,
              "Finish": Phase.UPDATED, "Reboot": Phase.FROZEN}[command]
    core = in_phase(before, "ram")
    ASK[command](core)
    return core


# (under way, asked): the pairs whose phase allows the second, so that only the first
# being under way can refuse it (after Finish no session is left to drop).
REFUSED = [
    ("Prepare", "Freeze"), ("Prepare", "Cancel"), ("Prepare", "DropSession"),
    ("Freeze", "Freeze"),
    ("Cancel", "Prepare"), ("Cancel", "DropSession"),
    ("Finish", "Prepare"),
]


@pytest.mark.parametrize(("first", "second"), REFUSED)
def test_a_host_command_under_way_refuses_the_next_naming_itself(
    first: str, second: str
) -> None:
    core = under_way(first)
    with refused(core, WrongState, f"{second} is not possible while {first} is under way"):
        ASK[second](core)


@pytest.mark.parametrize("second", ["Cancel", "Reboot"])
def test_while_reboot_writes_the_handover_nothing_else(second: str) -> None:
    core = under_way("Reboot")
    with refused(core, WrongState, f"{second} is not possible: a Reboot is under way"):
        ASK[second](core)


@pytest.mark.parametrize("second", ["Cancel", "DropSession"])
def test_a_waiting_freeze_may_be_cancelled_or_unblocked(second: str) -> None:
    core = under_way("Freeze")
    ASK[second](core)
    assert core.phase is (Phase.NORMAL if second == "Cancel" else Phase.PREPARED)


@pytest.mark.parametrize("first", ["Prepare", "Cancel", "Finish"])
def test_done_ends_it_and_the_next_may_come(first: str) -> None:
    core = under_way(first)
    core.done(first)
    assert core.in_flight == ""
    ASK["Freeze" if first == "Prepare" else "Prepare"](core)


def test_done_for_another_command_ends_nothing() -> None:
    core = under_way("Prepare")
    core.done("Cancel")
    assert core.in_flight == "Prepare"
