"""liveupdated as a real systemd service: installed from its .deb in a booted container,
driven with busctl, through crashes, restarts and a real reboot standing in for the kexec."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .installed import HANDOVER, MANAGER, PYTHON, Installed, wait_for

pytestmark = pytest.mark.nspawn

LAYOUT = (
    "/usr/lib/liveupdated/bin/liveupdated",
    "/usr/lib/liveupdated/bin/liveupdatectl",
    "/usr/lib/systemd/system/liveupdated.service",
    "/usr/lib/tmpfiles.d/liveupdated.conf",
    "/usr/share/dbus-1/system.d/org.liveupdate1.conf",
    "/usr/share/dbus-1/system-services/org.liveupdate1.service",
    "/usr/share/dbus-1/interfaces/org.liveupdate1.Manager.xml",
    "/usr/share/dbus-1/interfaces/org.liveupdate1.Session.xml",
    "/usr/share/doc/liveupdated/README.md",
    "/usr/share/polkit-1/actions/org.liveupdate1.policy",
    "/usr/share/bash-completion/completions/liveupdatectl",
)
# Built from their scdoc sources where the package is built (the host).
MANUAL = (
    "/usr/share/man/man8/liveupdated.8.gz",
    "/usr/share/man/man1/liveupdatectl.1.gz",
    "/usr/share/man/man5/org.liveupdate1.5.gz",
)


def test_installed_service(installed: Installed, liveupdated_deb: Path) -> None:
    box = installed.box
    owned = box.run(["dpkg-query", "--listfiles", "liveupdated"]).stdout.splitlines()
    assert set(LAYOUT) | set(MANUAL) <= set(owned)
    for command, target in (
        ("/usr/bin/liveupdatectl", "/usr/lib/liveupdated/bin/liveupdatectl"),
        ("/usr/sbin/liveupdated", "/usr/lib/liveupdated/bin/liveupdated"),
    ):
        assert box.run(["readlink", "--canonicalize", command]).stdout.strip() == target
    prefixes = box.run([PYTHON, "-c", "import sys; print(sys.prefix, sys.base_prefix)"])
    assert prefixes.stdout.split() == ["/usr/lib/liveupdated", "/usr"]
    # --man=no: the pages are in the package (MANUAL), but minbase has no man to open them.
    verify = box.run(["systemd-analyze", "verify", "--man=no", "liveupdated.service"]).stderr
    # systemd 252 does not know FileDescriptorStorePreserve= (254): a harmless warning.
    assert [line for line in verify.splitlines()
            if "FileDescriptorStorePreserve" not in line] == []
    assert installed.systemctl("is-enabled", "liveupdated") == "enabled"

    installed.systemctl("start", "liveupdated")
    assert installed.systemctl("is-active", "liveupdated") == "active"
    introspection = box.run(["busctl", "--system", "introspect", *MANAGER[:2]]).stdout
    assert any(
        line.split()[:2] == ["org.liveupdate1.Manager", "interface"]
        for line in introspection.splitlines()
    )
    assert {".Prepare", ".Freeze", ".Reboot", ".Finish", ".CreateSession"} <= {
        line.split()[0] for line in introspection.splitlines() if line.startswith(".")
    }
    version = liveupdated_deb.name.split("_")[1]
    assert installed.prop("State") == "normal"
    assert installed.prop("Backend") == "simulated"
    assert installed.prop("Version") == version
    assert installed.show("StatusText") == {"StatusText": "normal, 0 sessions, 0 fds"}
    assert installed.fd_store() == 0
    status = box.run(["liveupdatectl", "status", "--json"]).stdout
    assert '"State": "normal"' in status

    # Bus activation: the first call to org.liveupdate1 starts the stopped unit.
    installed.systemctl("stop", "liveupdated")
    assert installed.systemctl("is-active", "liveupdated", check=False) == "inactive"
    assert installed.prop("State") == "normal"
    assert installed.systemctl("is-active", "liveupdated") == "active"

    # Removal stops the daemon and leaves no unit and no code behind.
    box.run(["apt-get", "remove", "--yes", "--quiet", "liveupdated"])
    assert installed.show("LoadState", "ActiveState") == {
        "LoadState": "masked",  # as dh_installsystemd does until purge
        "ActiveState": "inactive",
    }
    assert box.run(["test", "-e", "/usr/lib/liveupdated"], check=False).returncode == 1
    names = box.run(["busctl", "--system", "--acquired", "list"]).stdout
    assert "org.liveupdate1" not in names
    box.run(["apt-get", "purge", "--yes", "--quiet", "liveupdated"])
    assert installed.show("LoadState")["LoadState"] == "not-found"
    assert box.run(["ls", "-A", "/var/lib/liveupdated"]).stdout.split() == ["handover"]


def test_crash_and_restart_lose_nothing(installed: Installed) -> None:
    installed.systemctl("start", "liveupdated")
    handed = installed.start_vmm("vm-a")
    baseline = installed.vmm_show("vm-a")
    assert baseline["fingerprints"] == handed
    assert [f["token"] for f in baseline["fds"]] == ["guest-ram", "vm-state"]
    assert [(s["name"], s["owner"], s["fd_count"]) for s in baseline["sessions"]] == [
        ("vm-a", 0, 2)
    ]
    installed.wait_fd_store(installed.held_fds())
    assert installed.held_fds() == 2
    installed.wait_status("normal, 1 sessions, 2 fds")

    # A crash: Restart=on-failure, and the new process gets its fds from the fd store.
    before = installed.show("MainPID", "NRestarts")
    installed.systemctl("kill", "--kill-who=main", "--signal=KILL", "liveupdated")
    installed.wait_restarted(before)
    assert installed.vmm_show("vm-a") == baseline
    installed.wait_fd_store(2)

    # An orderly restart keeps the store as well, and so does a package upgrade (here a
    # reinstall), which restarts the daemon rather than stopping it.
    installed.systemctl("restart", "liveupdated")
    assert installed.vmm_show("vm-a") == baseline
    before = installed.show("MainPID")
    installed.apt_install("--reinstall")
    assert installed.show("MainPID") != before
    assert installed.vmm_show("vm-a") == baseline

    # A crash after Prepare keeps the phase, the sessions and the fds.
    installed.call("Prepare")
    before = installed.show("MainPID", "NRestarts")
    installed.systemctl("kill", "--kill-who=main", "--signal=KILL", "liveupdated")
    installed.wait_restarted(before)
    prepared = installed.vmm_show("vm-a")
    assert prepared["state"] == "prepared"
    assert prepared["fds"] == baseline["fds"]
    assert [s["fd_count"] for s in prepared["sessions"]] == [2]
    installed.wait_fd_store(2)

    # A torn journal tail is cut at the next start, and logged as an error.
    installed.box.run("printf torn >> /var/lib/liveupdated/journal")
    installed.systemctl("restart", "liveupdated")
    cut = installed.wait_logged("err", "journal_tail_cut")
    assert cut["PRIORITY"] == "3"
    assert len("torn") in cut["MESSAGE"].values()  # the bytes cut off
    assert installed.prop("State") == "prepared"

    installed.call("Cancel")
    assert installed.vmm_show("vm-a") == baseline
    installed.wait_fd_store(2)

    # Every line is a JSON object at its own priority: info is not in -p err.
    ready = installed.wait_logged("info", "ready")
    assert ready["PRIORITY"] == "6"
    assert ready["MESSAGE"]["level"] == "info"
    assert "ready" not in {e["MESSAGE"].get("event") for e in installed.journal("err")}
    assert {"session_created", "fds_preserved", "state_changed"} <= {
        e["MESSAGE"].get("event") for e in installed.journal("info")
    }

    # A session that went through Prepare outlives its VMM even after a Cancel (its
    # memory may be all that is left of the VM); root drops it, and the store empties.
    installed.systemctl("stop", "vmm-vm-a.service")
    installed.wait_status("normal, 1 sessions, 2 fds")
    assert [row[0] for row in installed.sessions()] == ["vm-a"]
    installed.busctl("call", *MANAGER, "DropSession", "ss", "vm-a", "its VMM is gone")
    wait_for(lambda: True if installed.sessions() == [] else None, "vm-a dropped")
    installed.wait_fd_store(0)
    installed.wait_status("normal, 0 sessions, 0 fds")


def test_update_across_reboot(installed: Installed, capsys: pytest.CaptureFixture[str]) -> None:
    installed.systemctl("start", "liveupdated")
    handed = installed.start_vmm("vm-b")
    other = installed.start_vmm("vm-c")  # the same two VMs as test_sid.py's
    old_boot = installed.box.boot_id()
    # The unit as shipped: behind ProtectKernelTunables= the daemon reads the host's boot id.
    host_boot = installed.prop("BootId")
    assert host_boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip() != old_boot

    installed.call("Prepare")
    assert installed.prop("State") == "prepared"
    started = time.monotonic()
    installed.call("Freeze")
    assert installed.prop("State") == "frozen"
    # Reboot(): the daemon writes the handover, then runs `systemctl reboot`.
    new_boot = installed.box.reboot(
        command=["busctl", "--system", "call", *MANAGER, "Reboot"]
    )

    assert new_boot != old_boot
    assert installed.box.exit_codes == [133]
    rebooting = installed.wait_logged("info", "rebooting")  # in the previous boot
    assert rebooting["MESSAGE"]["action"] == "systemctl reboot"  # the default under systemd
    assert rebooting["_BOOT_ID"] == old_boot.replace("-", "")
    assert installed.systemctl("is-active", "liveupdated") == "active"  # enabled: at boot
    assert installed.prop("State") == "updated"
    assert installed.prop("BootId") == host_boot  # PID 1's start time told the new boot
    assert installed.show("StatusText")["StatusText"] == "updated, 2 sessions, 4 fds"
    installed.wait_fd_store(0)  # nothing is restored before it is asked for
    assert {p.name for p in installed.handover.iterdir()} >= {"kexec-record.json"}

    report = installed.vmm_show("vm-b")
    assert installed.vmm_show("vm-c")["fingerprints"] == other
    blackout = time.monotonic() - started
    assert report["fingerprints"] == handed
    assert report["files"] != installed.vmm_files("vm-b")  # copied back into new memfds
    with capsys.disabled():
        print(f"\nsimulated (bookworm, systemd 252, reboot): blackout {blackout:.2f} s from "
              "Freeze to every fd back (2 VMs, 4 memfds, 128 MiB)")
    ram = handed["guest-ram"]
    assert (ram["size"], len(ram["extents"]), ram["position"]) == (64 << 20, 10, 3 * 4096)
    assert installed.prop("LastBlackoutUSec") > 0
    installed.wait_fd_store(4)  # the restored memfds, in the store like any held fd

    installed.call("Finish")
    assert installed.prop("State") == "normal"
    installed.wait_fd_store(installed.held_fds())
    assert list(installed.handover.iterdir()) == []
    assert installed.box.run(["ls", "-A", HANDOVER]).stdout == ""
