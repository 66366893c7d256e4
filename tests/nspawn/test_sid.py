"""liveupdated on Debian sid (systemd 262): the fdstore backend, where systemd itself carries
the memfds in the unit's fd store across a soft-reboot (the simulated kexec). The .deb is
built for sid's Python (3.14): its venv on sid's python3, from wheels made on the host."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


def _wait_active(installed: Installed, what: str) -> None:
    wait_for(lambda: True if installed.systemctl("is-active", UNIT, check=False) == "active"
             else None, what)


def _bare_soft_reboot(installed: Installed) -> float:
    """The floor of a soft-reboot cycle: a bare soft-reboot, timed as the cycle's is,
    to liveupdated active again."""
    started = time.monotonic()
    installed.box.soft_reboot()
    _wait_active(installed, "liveupdated active after a bare soft-reboot")
    return time.monotonic() - started


def _cycle_under_way(installed: Installed) -> dict[str, Any]:
    """The update cycle in the daemon's history, its phases by its own clock."""
    history = json.loads(installed.box.run(["liveupdatectl", "history", "--json"]).stdout)
    [cycle] = [c for c in history if c["outcome"] == "in progress"]
    assert cycle["fds_retrieved"] == 4 and cycle["blackout_ms"] is not None
    return dict(cycle)


def _keeper_restarted(installed: Installed) -> list[dict[str, Any]]:
    try:
        return wait_for(lambda: s if len(s := keeper_starts(installed)) == 2 else None,
                        "keeper started again", timeout=10)
    except TimeoutError:
        status = installed.box.run(["systemctl", "status", "--no-pager", "-n", "30", KEEPER],
                                   check=False).stdout
        raise AssertionError(f"keeper did not start again:\n{status}") from None


def _figures(blackout: float, to_active: float, bare: float, cycle: dict[str, Any]) -> str:
    return (f"blackout {blackout:.2f} s from Freeze to every fd back (2 VMs, 4 memfds, "
            f"128 MiB), as the test sees it: {blackout - bare:+.2f} s over a bare "
            f"soft-reboot's {bare:.2f} s (target: +0.3 s at most); Freeze to liveupdated "
            f"active {to_active:.2f} s ({to_active - bare:+.2f} s); by the "
            f"daemon's own clock (history) Freeze to the last fd back {cycle['blackout_ms']} "
            f"ms, of which Freeze to Reboot() {cycle['freeze_to_reboot_ms']} ms and the new "
            f"daemon to the last fd {cycle['last_fd_ms']} ms")


def _finish_race(installed: Installed) -> None:
    """Session.Finish pipelined with Manager.Finish: the backend lets go once, in order,
    and every call is answered (done, or refused once the update has ended)."""
    race = installed.vmm_finish_race("vm-s1", "vm-s2")
    refused = ("WrongState", "NoSuchSession")
    assert all(o is None or o.startswith(refused) for o in race["outcomes"]), race
    assert race["outcomes"][:2] == [None, None], race  # the first two land in updated
    assert (race["state"], race["sessions"]) == ("normal", [])
    assert installed.prop("State") == "normal"
    installed.wait_fd_store(0)  # the VMMs went with the old userspace: nothing held now
    assert not installed.journal("err"), installed.journal("err")


def test_fdstore_backend_across_soft_reboot(
    sid_installed: Installed, capsys: pytest.CaptureFixture[str]
) -> None:
    installed, box = sid_installed, sid_installed.box
    version = box.run(["systemctl", "--version"]).stdout.split()[1]
    assert int(version) >= 254, version
    installed.systemctl("start", "liveupdated")
    assert installed.prop("Backend") == "fdstore"  # auto: PID 1 can carry the store
    bare = _bare_soft_reboot(installed)
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
    _wait_active(installed, "liveupdated active after the soft-reboot")
    to_active = time.monotonic() - started
    assert installed.prop("State") == "updated"
    rebooting = installed.wait_logged("info", "rebooting")
    assert (rebooting["MESSAGE"]["action"], rebooting["MESSAGE"]["backend"]) == (
        "soft-reboot", "fdstore")
    found = installed.wait_logged("info", "handover_found")
    assert found["MESSAGE"]["soft_reboots"] == before + 1
    installed.wait_fd_store(4)  # the very fds, still in the store: nothing to restore

    # The VMMs come back at once, as a host's do (one after the other, the second VMM's
    # start would count against liveupdated).
    with ThreadPoolExecutor(len(handed)) as vmms:
        reports = dict(zip(handed, vmms.map(installed.vmm_show, handed), strict=True))
    blackout = time.monotonic() - started
    for vm, report in reports.items():
        assert report["fingerprints"] == handed[vm]  # byte-exact: data, holes, seals, ...
        assert report["files"] == files[vm]  # the same inodes: nothing was copied
    ram = handed["vm-s1"]["guest-ram"]
    assert (ram["size"], len(ram["extents"]), ram["position"]) == (64 << 20, 10, 3 * 4096)
    with capsys.disabled():
        print(f"\nfdstore (sid, systemd {version}, soft-reboot): "
              + _figures(blackout, to_active, bare, _cycle_under_way(installed)))

    # The unrelated unit kept its store across the same soft-reboot.
    assert _keeper_restarted(installed)[-1] == {**keeper, "from_store": True}

    _finish_race(installed)

    # Removal releases the store that FileDescriptorStorePreserve=yes keeps past a stop.
    installed.systemctl("stop", "vmm-vm-s1.service", check=False)
    installed.start_vmm("vm-s3")
    installed.wait_fd_store(2)
    box.run(["apt-get", "remove", "--yes", "--quiet", "liveupdated"])
    assert installed.fd_store() == 0
