"""The .deb in a booted bookworm container, installed as a user installs it: the unit as
shipped, no drop-in of the tests, the handover where the package puts it (on the
container's disk, which its reboots keep). On bookworm (systemd 252) the daemon runs the
simulated backend and reboots with `systemctl reboot`. Behind the unit's
ProtectKernelTunables= it reads the host's boot id, the same in every boot of the
container: only PID 1's start time tells it that the container booted again.

An update across a real reboot, driven by liveupdatectl, gives every fd back byte-exact;
a reboot action that fails leaves the daemon running, frozen, its handover kept, and a
Cancel gives every fd back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from liveupdated.core.records import Rebooted, RebootFailed, RebootStarted, Record
from liveupdated.journal import decode

from .container import Container, ContainerFactory
from .installed import HANDOVER, UNIT, Installed, wait_for

pytestmark = pytest.mark.nspawn

CTL = "liveupdatectl"
JOURNAL = "/var/lib/liveupdated/journal"
# What a user writes to change the daemon's options (systemctl edit liveupdated).
OPTIONS_DROP_IN = "/etc/systemd/system/liveupdated.service.d/options.conf"
FAILING_ACTION = """[Service]
ExecStart=
ExecStart=/usr/lib/liveupdated/bin/liveupdated --bus system --reboot-action /bin/false
"""
MONITOR = "reboot-failed-monitor"
REBOOT_FAILED_MATCH = ("type='signal',"
                       "interface='org.liveupdate1.Manager',member='RebootFailed'")
# A signal of the test's own, seen by the monitor once it listens.
PING = ("/org/liveupdate1/test", "org.liveupdate1.Test", "Ping")
PING_MATCH = "type='signal',interface='org.liveupdate1.Test',member='Ping'"
# What the daemon logs when it takes the new boot for a restart, or loses fds (issue 19's
# case 1): never to be seen here.
LOSS_EVENTS = {"unfinished_handover_discarded", "fd_lost", "stale_handover_discarded",
               "reboot_interrupted", "handover_used"}


@pytest.fixture
def packaged(container: ContainerFactory, liveupdated_deb: Path) -> Installed:
    box = container()
    installed = Installed.install(box, liveupdated_deb, box.host_path(HANDOVER))
    assert installed.show("DropInPaths") == {"DropInPaths": ""}  # the unit as shipped
    installed.systemctl("start", UNIT)  # postinst started it: a no-op then
    return installed


def status(box: Container) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(box.run([CTL, "status", "--json"]).stdout)
    return found


def host_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def pid1_start(box: Container) -> int:
    """The container's PID 1's start time (/proc/PID/stat field 22), read from the host:
    the same number the daemon reads as /proc/1/stat inside."""
    stat = Path(f"/proc/{box.leader}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def journal_records(box: Container) -> list[Record]:
    records, damages, _ = decode(box.host_path(JOURNAL).read_bytes())
    assert damages == []
    return records


def events(installed: Installed) -> set[str]:
    return {str(e["MESSAGE"].get("event")) for e in installed.journal("debug")}


def test_update_across_a_real_reboot(packaged: Installed) -> None:
    box = packaged.box
    before = status(box)
    assert (before["State"], before["Backend"]) == ("normal", "simulated")
    old_boot = box.boot_id()
    # The case of issue 19: the daemon's boot id is the host's, and it stays so.
    assert before["BootId"] == host_boot_id() != old_boot
    handed = packaged.start_vmm("vm-a")
    packaged.wait_fd_store(2)
    old_pid1 = pid1_start(box)

    new_boot = box.reboot(command=f"{CTL} prepare && {CTL} freeze && {CTL} reboot")

    assert new_boot != old_boot
    assert box.exit_codes == [133]  # systemd-nspawn's status for a reboot inside
    rebooting = packaged.wait_logged("info", "rebooting")
    assert rebooting["MESSAGE"]["action"] == "systemctl reboot"
    assert rebooting["_BOOT_ID"] == old_boot.replace("-", "")
    assert packaged.systemctl("is-active", UNIT) == "active"  # enabled: started at boot
    after = status(box)
    assert after["State"] == "updated", packaged.journal("info")
    assert after["BootId"] == before["BootId"]  # no help from the boot id
    assert (after["Sessions"], after["Fds"]) == (1, 2)
    # The evidence: PID 1's start time as Reboot recorded it, and another one now.
    records = journal_records(box)
    started = [r for r in records if isinstance(r, RebootStarted)]
    assert [r.pid1_start for r in started] == [old_pid1]
    new_pid1 = pid1_start(box)
    assert new_pid1 != old_pid1
    assert [r for r in records if isinstance(r, Rebooted)] != []
    found = packaged.wait_logged("info", "handover_found")["MESSAGE"]
    assert (found["previous_boot"], found["fds"]) == (before["BootId"], 2)
    assert f"PID 1 started at tick {new_pid1}" in found["evidence"]
    assert not LOSS_EVENTS & events(packaged)

    report = packaged.vmm_show("vm-a")  # RetrieveSession, then RetrieveFd of each fd
    assert report["state"] == "updated"
    assert [f["token"] for f in report["fds"]] == ["guest-ram", "vm-state"]
    assert report["fingerprints"] == handed  # size, seals, position, sha256 of the data

    assert box.run([CTL, "finish"]).stdout.strip() == "finish: ok, state normal"
    assert status(box)["State"] == "normal"
    assert box.run(["ls", "-A", HANDOVER]).stdout == ""
    assert packaged.journal("err") == []


def test_a_failing_reboot_action_leaves_the_daemon_frozen(packaged: Installed) -> None:
    box = packaged.box
    box.run(["mkdir", "-p", str(Path(OPTIONS_DROP_IN).parent)])
    box.run(["tee", OPTIONS_DROP_IN], input=FAILING_ACTION)
    packaged.systemctl("daemon-reload")
    packaged.systemctl("restart", UNIT)
    assert "--reboot-action /bin/false" in packaged.show("ExecStart")["ExecStart"]
    handed = packaged.start_vmm("vm-a")
    packaged.wait_fd_store(2)
    watch_reboot_failed(box)

    box.run(f"{CTL} prepare && {CTL} freeze")
    daemon = packaged.show("MainPID", "NRestarts")
    reply = box.run([CTL, "reboot"])  # the handover is written before the action runs
    assert reply.stdout.startswith("reboot: ok, handover written")

    signalled = wait_for(lambda: reboot_failed_seen(box), "RebootFailed on the bus")
    assert "'/bin/false' failed: exit status 1" in signalled
    logged = packaged.wait_logged("crit", "reboot_failed")
    assert logged["PRIORITY"] == "2"
    assert logged["MESSAGE"]["reason"] == signalled
    assert packaged.systemctl("is-active", UNIT) == "active"
    assert packaged.show("MainPID", "NRestarts") == daemon  # the same process, not restarted
    assert status(box)["State"] == "frozen"
    assert (box.boots, box.exit_codes) == (1, [])  # no reboot
    assert "kexec-record.json" in box.run(["ls", "-A", HANDOVER]).stdout.split()  # kept
    assert [r.reason for r in journal_records(box) if isinstance(r, RebootFailed)] == [
        signalled
    ]

    assert box.run([CTL, "cancel"]).stdout.strip() == "cancel: ok, state normal"
    report = packaged.vmm_show("vm-a")  # RetrieveFd is allowed in normal
    assert report["state"] == "normal"
    assert report["fingerprints"] == handed
    assert box.run(["ls", "-A", HANDOVER]).stdout == ""  # deleted once the Cancel is durable
    assert not LOSS_EVENTS & events(packaged)


def watch_reboot_failed(box: Container) -> None:
    """busctl monitor for RebootFailed, as a unit whose output goes to the journal; returns
    once it listens (it has seen the test's own Ping)."""
    box.run(["systemd-run", f"--unit={MONITOR}", "--quiet", "--", "busctl", "--system",
             "monitor", "--json=short", f"--match={REBOOT_FAILED_MATCH}",
             f"--match={PING_MATCH}"])

    def listening() -> bool | None:
        box.run(["busctl", "--system", "emit", *PING])
        return True if any(m["member"] == "Ping" for m in monitored(box)) else None

    wait_for(listening, "busctl monitor listening")


def monitored(box: Container) -> list[dict[str, Any]]:
    """The messages the monitor printed (one JSON object a line)."""
    out = box.run(["journalctl", f"--unit={MONITOR}", "--output=cat", "--no-pager"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def reboot_failed_seen(box: Container) -> str | None:
    """The reason of the first RebootFailed the monitor saw, None before it saw one."""
    for message in monitored(box):
        if message["member"] == "RebootFailed":
            reason: str = message["payload"]["data"][0]
            return reason
    return None
