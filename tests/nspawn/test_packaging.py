"""packaging/install.sh on a running system: the install without a package manager."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .container import ContainerFactory
from .installed import REPO
from .test_service import LAYOUT

pytestmark = pytest.mark.nspawn

SOURCE = "/opt/liveupdated-src"


def test_install_script(container: ContainerFactory, liveupdated_wheels: Path) -> None:
    box = container()
    for part in ("packaging", "units", "dbus", "polkit", "completions", "man", "docs",
                 "README.md"):
        box.copy_in(REPO / part, f"{SOURCE}/{part}")
    box.copy_in(liveupdated_wheels, "/opt/wheels")
    install = [f"{SOURCE}/packaging/install.sh", "--wheels", "/opt/wheels"]

    box.run([*install, "--enable"])

    for path in LAYOUT:
        box.run(["test", "-f", path])
    assert box.run(["systemctl", "is-enabled", "liveupdated"]).stdout.strip() == "enabled"
    assert box.run(["systemctl", "is-active", "liveupdated"]).stdout.strip() == "active"
    status = json.loads(box.run(["liveupdatectl", "status", "--json"]).stdout)
    assert (status["State"], status["Backend"]) == ("normal", "simulated")

    # Again, over the running install: the venv is swapped whole, nothing is left over,
    # and the running daemon is restarted onto it.
    main_pid = ["systemctl", "show", "--property=MainPID", "--value", "liveupdated"]
    before = box.run(main_pid).stdout
    box.run(install)
    entries = box.run(["ls", "-A", "/usr/lib"]).stdout.split()
    assert [e for e in entries if "liveupdated" in e] == ["liveupdated"]
    assert box.run(main_pid).stdout != before
    assert json.loads(box.run(["liveupdatectl", "status", "--json"]).stdout)["State"] == "normal"
