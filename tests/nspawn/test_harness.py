"""Checks that the nspawn harness boots systemd, runs commands and reboots for real.
These guard the assumptions the service's integration tests are built on."""

from __future__ import annotations

from pathlib import Path

import pytest

from .container import CommandError, ContainerFactory
from .rootfs import HOSTNAME

pytestmark = pytest.mark.nspawn


def test_boot_and_run(container: ContainerFactory) -> None:
    box = container()
    assert box.run(["systemctl", "is-system-running"]).stdout.strip() in ("running", "degraded")
    assert box.run(["cat", "/proc/1/comm"]).stdout == "systemd\n"
    assert box.run("echo hello from $(hostname)").stdout == f"hello from {HOSTNAME}\n"
    assert box.run(["env"]).stdout.splitlines() == ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    with pytest.raises(CommandError) as failed:
        box.run(["sh", "-c", "echo oops >&2; exit 7"])
    assert failed.value.result.returncode == 7
    assert failed.value.result.stderr == "oops\n"


def test_run_unit_is_a_service(container: ContainerFactory) -> None:
    box = container()
    result = box.run_unit("cat /proc/self/cgroup; exit 3", check=False)
    assert result.returncode == 3
    assert result.stdout.rstrip().endswith(".service")
    assert "/system.slice/run-" in result.stdout


def test_copy_in(container: ContainerFactory, tmp_path: Path) -> None:
    box = container()
    payload = tmp_path / "payload"
    (payload / "sub").mkdir(parents=True)
    (payload / "sub" / "file.txt").write_text("payload\n")
    box.copy_in(payload, "/opt/payload")
    assert box.run(["cat", "/opt/payload/sub/file.txt"]).stdout == "payload\n"
    unit = tmp_path / "probe.service"
    unit.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    # /lib is a symlink into /usr in the guest: the copy must land inside the root.
    assert box.copy_in(unit, "/lib/systemd/system/probe.service") == (
        box.root / "usr/lib/systemd/system/probe.service"
    )
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "start", "probe.service"])
    with pytest.raises(ValueError, match="volatile"):
        box.copy_in(unit, "/tmp/probe.service")
    with pytest.raises(ValueError, match="volatile"):
        box.copy_in(unit, "/var/run/probe.service")


def test_reboot_is_real(container: ContainerFactory, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    box = container([(state, "/var/lib/liveupdated")])
    first_boot = box.boot_id()
    first_leader = box.leader
    box.run("echo kept > /var/lib/liveupdated/marker; touch /run/marker /var/tmp/marker")
    assert (state / "marker").read_text() == "kept\n"
    assert box.run(["test", "-e", "/run/marker"], check=False).returncode == 0

    second_boot = box.reboot()

    assert second_boot != first_boot
    assert box.boot_id() == second_boot
    assert box.exit_codes == [133]
    assert box.boots == 2
    assert box.leader != first_leader
    assert box.run(["cat", "/var/lib/liveupdated/marker"]).stdout == "kept\n"
    assert box.run(["test", "-e", "/run/marker"], check=False).returncode == 1
    assert box.run(["test", "-e", "/var/tmp/marker"], check=False).returncode == 0


def test_poweroff_and_close_leave_nothing(container: ContainerFactory) -> None:
    box = container()
    leader = box.leader
    box.poweroff()
    assert box.exit_codes == [0]
    assert not Path(f"/proc/{leader}").exists()
    killed = container()
    leader = killed.leader
    killed.close(timeout=0)  # no time for a clean shutdown: the kill path
    assert killed.exit_codes[-1] != 0
    status = Path(f"/proc/{leader}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()
