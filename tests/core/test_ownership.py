"""The one ownership rule (`Orchestrator.may_use`): calls, properties, introspection
and the listing of sessions all ask it, so they cannot disagree."""

import pytest

from liveupdated.core.errors import AccessDenied, NoSuchSession
from liveupdated.core.orchestrator import Caller
from tests.core.steps import ALICE, BOB, ROOT, VM, core_with


@pytest.mark.parametrize("caller, allowed", [(ALICE, True), (ROOT, True), (BOB, False)])
def test_a_session_is_its_owners_and_roots(caller: Caller, allowed: bool) -> None:
    core = core_with("ram")
    assert core.may_use(caller, VM) is allowed
    assert ([s.name for s in core.visible_sessions(caller)] == [VM]) is allowed
    if allowed:
        assert core.owned_session(caller, VM).name == VM
    else:
        with pytest.raises(AccessDenied, match="belongs to uid 1000"):
            core.owned_session(caller, VM)


def test_no_one_may_use_a_session_that_does_not_exist() -> None:
    core = core_with()
    assert not core.may_use(ROOT, "absent")
    with pytest.raises(NoSuchSession):
        core.owned_session(ROOT, "absent")
