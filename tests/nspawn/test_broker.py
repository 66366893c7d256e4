"""liveupdated on dbus-broker, the system bus of Fedora, RHEL and Arch: the fdstore cycle
across a soft-reboot, and a tenant's flood that never reads, in a sid container whose
system bus is dbus-broker (enabled as a user does: it takes over dbus.service)."""

from __future__ import annotations

import time

import pytest

from .installed import MANAGER, PYTHON, UNIT, Installed, wait_for

pytestmark = pytest.mark.nspawn

FLOOD = "/opt/liveupdated-tests/flood.py"


def _on_dbus_broker(installed: Installed) -> None:
    box = installed.box
    installed.systemctl("enable", "dbus-broker.service")
    box.reboot()
    bus = box.run(["systemctl", "show", "--property=Id", "--value", "dbus.service"]).stdout
    assert bus.strip() == "dbus-broker.service"
    wait_for(lambda: True if installed.systemctl("is-active", UNIT, check=False) == "active"
             else None, "liveupdated active on dbus-broker")


def test_fdstore_cycle_on_dbus_broker(sid_installed: Installed) -> None:
    installed, box = sid_installed, sid_installed.box
    _on_dbus_broker(installed)
    assert installed.prop("Backend") == "fdstore"
    handed = {vm: installed.start_vmm(vm) for vm in ("vm-b1", "vm-b2")}
    files = {vm: installed.vmm_files(vm) for vm in handed}
    installed.wait_fd_store(4)
    before = box.soft_reboots()
    installed.call("Prepare")
    installed.call("Freeze")
    assert box.soft_reboot(command=["busctl", "--system", "call", *MANAGER, "Reboot"]) == \
        before + 1
    wait_for(lambda: True if installed.systemctl("is-active", UNIT, check=False) == "active"
             else None, "liveupdated active after the soft-reboot")
    assert installed.prop("State") == "updated"
    for vm, fingerprints in handed.items():
        report = installed.vmm_show(vm)
        assert report["fingerprints"] == fingerprints  # byte-exact
        assert report["files"] == files[vm]  # the very files: nothing copied
    installed.call("Finish")
    assert installed.prop("State") == "normal"


def test_a_tenant_flood_does_not_throw_liveupdated_off_dbus_broker(
    sid_installed: Installed,
) -> None:
    """40 connections of uid 65534, 128 unread ListSessions each (with its own sessions
    named long, so the answers are large): dbus-broker used to disconnect liveupdated
    (its uid's fd quota); now the daemon stays on the bus and root is answered."""
    installed, box = sid_installed, sid_installed.box
    _on_dbus_broker(installed)
    box.copy_in(__file__.replace("test_broker.py", "flood.py"), FLOOD)
    restarts = installed.show("NRestarts")["NRestarts"]
    box.run(["systemd-run", "--unit=flood", "--uid=65534", "--property=Type=exec",
             PYTHON, FLOOD, "40", "128"])
    wait_for(lambda: True if "flooding" in box.run(
        ["journalctl", "--unit", "flood", "--output", "cat", "--no-pager"],
        check=False).stdout else None, "the flood under way", 120)
    for _ in range(5):  # root's calls through the flood, each within a second
        started = time.monotonic()
        assert installed.prop("State") == "normal"
        assert time.monotonic() - started < 1.0
    box.run(["systemctl", "stop", "flood"])
    assert installed.systemctl("is-active", UNIT, check=False) == "active"
    assert installed.show("NRestarts")["NRestarts"] == restarts  # never thrown off
    log = box.run(["journalctl", "--unit", "dbus-broker", "--no-pager"], check=False).stdout
    assert "is being disconnected" not in log
