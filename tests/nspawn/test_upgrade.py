"""An update that brings a newer liveupdated: the previous release hands the VMs' memfds
over, the new kernel's userspace has this tree's package, and its daemon gives every fd
back. The previous release is liveupdated 0.1.0 (commit c81b72a), its .deb built with
its own packaging scripts and cached beside the root file systems."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import liveupdated
from liveupdated.core.records import (
    DaemonStarted,
    KexecSimulated,
    PhaseChanged,
    Rebooted,
    RebootStarted,
    Record,
)
from liveupdated.journal import decode

from .container import Container, ContainerFactory
from .installed import HANDOVER, REPO, Installed, host_run, wait_for
from .rootfs import BOOKWORM, CACHE_DIR, cache_key

pytestmark = pytest.mark.nspawn

PREVIOUS = "c81b72a"  # liveupdated 0.1.0
PREVIOUS_VERSION = "0.1.0"
JOURNAL = "/var/lib/liveupdated/journal"
# Under this drop-in the previous release's Reboot writes the handover and exits (its
# reboot action `exit`) instead of running `systemctl reboot`: the test then installs
# the new package, as the new kernel's userspace would bring it, and reboots for real.
# 0.1.0 records only its boot id, so in a container only the container's own id lets any
# later release see the new boot; its unit's ProtectKernelTunables= and
# ProtectControlGroups= hide that id (0.1.0 was only ever tested with both off). This
# tree's unit is installed as shipped.
REBOOT_EXIT_DROP_IN = "/etc/systemd/system/liveupdated.service.d/reboot-exit.conf"
REBOOT_EXIT = """[Service]
ExecStart=
ExecStart=/usr/lib/liveupdated/bin/liveupdated --bus system --reboot-action exit
ProtectKernelTunables=no
ProtectControlGroups=no
"""
# Nothing may start the daemon before that reboot: a start in the same boot is a restart
# in FROZEN, which discards the handover. policy-rc.d keeps the postinst from starting it.
POLICY_RC_D = "/usr/sbin/policy-rc.d"


@pytest.fixture(scope="session")
def previous_deb(nspawn_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb of the previous release, built from its tree by its own scripts (venv on
    the bookworm root's Python), cached by commit and root."""
    cached = CACHE_DIR / f"liveupdated-{PREVIOUS}-{cache_key(BOOKWORM)}.deb"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f"{cached.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cached.exists():
            work = tmp_path_factory.mktemp("previous")
            src = work / "src"
            src.mkdir()
            tree = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS], check=True,
                                  capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=tree, check=True)
            # Its build-wheels.sh takes the Python to build with (no --python-version).
            host_run([str(src / "packaging/build-wheels.sh"), str(work / "wheels"),
                      sys.executable])
            out = host_run([str(src / "packaging/build-deb.sh"), str(work / "out"),
                            "--wheels", str(work / "wheels"), "--sysroot", str(nspawn_root)])
            deb = Path(out.strip().splitlines()[-1])
            partial = cached.with_name(cached.name + ".partial")
            shutil.copyfile(deb, partial)
            os.rename(partial, cached)
    return cached


def journal_records(box: Container) -> list[Record]:
    records, damages, _ = decode(box.host_path(JOURNAL).read_bytes())
    assert damages == []
    return records


def plain(boot_id: str) -> str:
    return boot_id.replace("-", "")


def test_previous_release_hands_over_and_this_one_gives_back(
    container: ContainerFactory, previous_deb: Path, liveupdated_deb: Path, tmp_path: Path
) -> None:
    handover = tmp_path / "handover"
    handover.mkdir(mode=0o700)
    box = container([(handover, HANDOVER)])
    drop_in = tmp_path / "reboot-exit.conf"
    drop_in.write_text(REBOOT_EXIT)
    box.copy_in(drop_in, REBOOT_EXIT_DROP_IN)
    installed = Installed.install(box, previous_deb, handover)
    assert installed.prop("Version") == PREVIOUS_VERSION

    # The first half of the cycle, all of it by the previous release.
    handed = installed.start_vmm("vm-b")
    other = installed.start_vmm("vm-c")
    old_boot = installed.prop("BootId")
    assert old_boot == box.boot_id()
    installed.call("Prepare")
    installed.call("Freeze")
    assert installed.prop("State") == "frozen"
    installed.call("Reboot")
    wait_for(lambda: True if installed.show("ActiveState")["ActiveState"] == "inactive"
             else None, "the previous release exits after its Reboot")
    assert installed.wait_logged("info", "rebooting")["MESSAGE"]["action"] == "exit"
    _previous_release_left_no_evidence(installed, old_boot)

    _install_without_starting(installed, liveupdated_deb, tmp_path)

    # The real reboot: only the boot id tells the new daemon that this is a new boot.
    new_boot = box.reboot()
    assert new_boot != old_boot
    assert installed.prop("Version") == liveupdated.__version__
    assert installed.prop("State") == "updated"
    host_boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert installed.prop("BootId") == host_boot  # this tree's sandbox: the host's id
    found = installed.wait_logged("info", "handover_found")
    assert plain(found["MESSAGE"]["previous_boot"]) == plain(old_boot)
    assert found["MESSAGE"]["fds"] == 4
    assert installed.show("StatusText")["StatusText"] == "updated, 2 sessions, 4 fds"

    assert installed.vmm_show("vm-b")["fingerprints"] == handed
    assert installed.vmm_show("vm-c")["fingerprints"] == other
    installed.call("Finish")
    assert installed.prop("State") == "normal"
    assert list(handover.iterdir()) == []
    assert installed.journal("err") == []
    started = [(r.version, plain(r.boot_id)) for r in journal_records(box)
               if isinstance(r, DaemonStarted)]
    assert started[-1] == (liveupdated.__version__, plain(host_boot))


def _previous_release_left_no_evidence(installed: Installed, old_boot: str) -> None:
    """A FROZEN journal with no record of the reboot (0.1.0 journaled none) nor of the
    daemon's start, and a kexec record without a version."""
    records = journal_records(installed.box)
    assert [r.new for r in records if isinstance(r, PhaseChanged)][-1] == "frozen"
    assert not [r for r in records
                if isinstance(r, RebootStarted | KexecSimulated | Rebooted | DaemonStarted)]
    body = (installed.handover / "kexec-record.json").read_bytes().rpartition(b"\n")[0]
    kexec = json.loads(body)
    assert "version" not in kexec
    assert plain(kexec["boot_id"]) == plain(old_boot)
    assert len(kexec["fds"]) == 4


def _install_without_starting(installed: Installed, deb: Path, tmp_path: Path) -> None:
    """This tree's package over the previous one, as the new kernel's userspace brings it:
    the reboot-exit drop-in goes, and policy-rc.d keeps the postinst from starting it."""
    box = installed.box
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    box.copy_in(policy, POLICY_RC_D)
    box.run(["rm", REBOOT_EXIT_DROP_IN])
    installed.package = f"/var/tmp/{deb.name}"
    box.copy_in(deb, installed.package)
    installed.apt_install()
    box.run(["rm", POLICY_RC_D])
    version = box.run(["dpkg-query", "--show", "--showformat=${Version}", "liveupdated"])
    assert version.stdout == liveupdated.__version__ != PREVIOUS_VERSION
    assert installed.show("ActiveState")["ActiveState"] == "inactive"
    # postinst compiled the bytecode the package does not ship.
    compiled = box.run(["find", "/usr/lib/liveupdated/lib", "-name", "daemon.*.pyc"])
    assert compiled.stdout.strip() != ""
