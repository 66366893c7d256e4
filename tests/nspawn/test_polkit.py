"""polkit delegates the host's commands, with the real polkitd and a real rule (sid).

A rule allows user `lu-operator` org.liveupdate1.manage; user `lu-tenant` has no rule. The
operator can Prepare and Cancel through busctl, the tenant gets AccessDenied, and root
needs no rule at all.
"""

from __future__ import annotations

import pytest

from .container import CommandError
from .installed import MANAGER, Installed

pytestmark = pytest.mark.nspawn

RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.liveupdate1.manage" && subject.user == "lu-operator")
        return polkit.Result.YES;
});
"""


def _as(user: str, member: str) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
            "busctl", "--system", "call", *MANAGER, member]


def test_a_polkit_rule_lets_an_operator_drive_the_update(sid_installed: Installed) -> None:
    installed, box = sid_installed, sid_installed.box
    for user in ("lu-operator", "lu-tenant"):
        box.run(["useradd", "--no-create-home", user])
    box.run(["sh", "-c", "cat >/etc/polkit-1/rules.d/50-liveupdate.rules"], input=RULE)
    box.run(["test", "-f", "/usr/share/polkit-1/actions/org.liveupdate1.policy"])
    installed.systemctl("start", "liveupdated")

    box.run(_as("lu-operator", "Prepare"))
    assert installed.prop("State") == "prepared"
    with pytest.raises(CommandError, match="Cancel is for the host's administrator"):
        box.run(_as("lu-tenant", "Cancel"))
    assert installed.prop("State") == "prepared"
    box.run(_as("lu-operator", "Cancel"))
    assert installed.prop("State") == "normal"
    with pytest.raises(CommandError, match=r"org\.liveupdate1\.manage"):
        box.run(_as("lu-tenant", "Prepare"))
    installed.call("Prepare")  # root: no rule needed
    assert installed.prop("State") == "prepared"
