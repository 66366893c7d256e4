"""liveupdated on Debian sid (systemd 262): the fdstore backend, where systemd itself carries
the memfds in the unit's fd store across a soft-reboot (the simulated kexec). The .deb is
built for sid's Python (3.14): its venv on sid's python3, from wheels made on the host."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .installed import MANAGER, UNIT, Installed, wait_for

pytestmark = pytest.mark.nspawn

HERE = Path(__file__).parent
KEEPER = "keeper.service"
KEEPER_LOG = "/var/tmp/keeper.jsonl"


def start_keeper(installed: Installed) -> dict[str, object]:
    box = installed.box
    box.copy_in(HERE / "keeper.py", "/opt/liveupdated-tests/keeper.py")
    box.copy_in(HERE / "keeper.service", f"/etc/systemd/system/{KEEPER}")
    installed.systemctl("daemon-reload")
    installed.systemctl("enable", "--now", KEEPER)
    return keeper_starts(installed)[-1]


def keeper_starts(installed: Installed) -> list[dict[str, object]]:
    import json

    out = installed.box.run(["cat", KEEPER_LOG]).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_fdstore_backend_across_soft_reboot(
    sid_installed: Installed, capsys: pytest.CaptureFixture[str]
) -> None:
    installed, box = sid_installed, sid_installed.box
    version = box.run(["systemctl", "--version"]).stdout.split()[1]
    assert int(version) >= 254, version
    installed.systemctl("start", "liveupdated")
    assert installed.prop("Backend") == "fdstore"  # auto: PID 1 can carry the store
    assert installed.show("FileDescriptorStorePreserve") == {"FileDescriptorStorePreserve": "yes"}
    keeper = start_keeper(installed)
    assert keeper["from_store"] is False

    handed = {vm: installed.start_vmm(vm) for vm in ("vm-s1", "vm-s2")}
    files = {vm: installed.vmm_files(vm) for vm in handed}
    installed.wait_fd_store(4)
    boot = box.boot_id()
    before = box.soft_reboots()

    installed.call("Prepare")
    started = time.monotonic()
    installed.call("Freeze")
    # Reboot(): RebootStarted (with SoftRebootsCount) journaled, then the daemon asks
    # systemd for a soft-reboot over D-Bus and exits; systemd keeps its fd store.
    after = box.soft_reboot(command=["busctl", "--system", "call", *MANAGER, "Reboot"])
    assert after == before + 1  # a plain restart of the daemon would leave it as it was
    assert box.boot_id() == boot  # a soft-reboot keeps the kernel and its boot id
    assert box.exit_codes == []  # systemd-nspawn never exited
    wait_for(lambda: True if installed.systemctl("is-active", UNIT, check=False) == "active"
             else None, "liveupdated active after the soft-reboot")
    assert installed.prop("State") == "updated"
    rebooting = installed.wait_logged("info", "rebooting")
    assert (rebooting["MESSAGE"]["action"], rebooting["MESSAGE"]["backend"]) == (
        "soft-reboot", "fdstore")
    found = installed.wait_logged("info", "handover_found")
    assert found["MESSAGE"]["soft_reboots"] == before + 1
    installed.wait_fd_store(4)  # the very fds, still in the store: nothing to restore

    reports = {vm: installed.vmm_show(vm) for vm in handed}
    blackout = time.monotonic() - started
    for vm, report in reports.items():
        assert report["fingerprints"] == handed[vm]  # byte-exact: data, holes, seals, ...
        assert report["files"] == files[vm]  # the same inodes: nothing was copied
    ram = handed["vm-s1"]["guest-ram"]
    assert (ram["size"], len(ram["extents"]), ram["position"]) == (64 << 20, 10, 3 * 4096)
    assert installed.prop("LastBlackoutUSec") > 0
    with capsys.disabled():
        print(f"\nfdstore (sid, systemd {version}, soft-reboot): blackout {blackout:.2f} s "
              f"from Freeze to every fd back (2 VMs, 4 memfds, 128 MiB); daemon says "
              f"{installed.prop('LastBlackoutUSec') / 1e6:.2f} s to its restart")

    # The unrelated unit kept its store across the same soft-reboot.
    try:
        starts = wait_for(lambda: s if len(s := keeper_starts(installed)) == 2 else None,
                          "keeper started again", timeout=10)
    except TimeoutError:
        status = box.run(["systemctl", "status", "--no-pager", "-n", "30", KEEPER],
                         check=False).stdout
        raise AssertionError(f"keeper did not start again:\n{status}") from None
    assert starts[-1] == {**keeper, "from_store": True}

    installed.call("Finish")
    assert installed.prop("State") == "normal"
    installed.wait_fd_store(0)  # the VMMs went with the old userspace: nothing held now

    # Removal releases the store that FileDescriptorStorePreserve=yes keeps past a stop.
    installed.systemctl("stop", "vmm-vm-s1.service", check=False)
    installed.start_vmm("vm-s3")
    installed.wait_fd_store(2)
    box.run(["apt-get", "remove", "--yes", "--quiet", "liveupdated"])
    assert installed.fd_store() == 0
