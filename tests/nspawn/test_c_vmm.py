"""examples/vmm.c, the VMM in C on sd-bus, built in the sid container against sid's
libsystemd and the header the package installs (/usr/include/liveupdate1.h), hands a
memfd to the installed liveupdated (fdstore backend) and takes it back after a
soft-reboot: the same file (st_dev, st_ino) and every byte, at the object path
sd_bus_path_encode computes, with the daemon's errors as errnos through the error map."""

from __future__ import annotations

import pytest

from .installed import MANAGER, REPO, UNIT, Installed, wait_for

pytestmark = pytest.mark.nspawn

SOURCE = "/opt/liveupdated-tests/vmm.c"
BINARY = "/opt/liveupdated-tests/vmm"
STATE = "/var/tmp/c-vmm.state"  # /var/tmp outlives the soft-reboot (/tmp does not)
SESSION = "7-c-vmm"  # a leading digit: sd_bus_path_encode escapes it
ESCAPED = "/org/liveupdate1/session/_37_2dc_2dvmm"
SIZE = 8 << 20


def test_c_vmm_across_soft_reboot(sid_installed: Installed) -> None:
    installed, box = sid_installed, sid_installed.box
    installed.systemctl("start", "liveupdated")
    assert installed.prop("Backend") == "fdstore"
    box.copy_in(REPO / "examples" / "vmm.c", SOURCE)
    box.run(["sh", "-c", f"cc -std=gnu11 -Wall -Wextra -Werror -o {BINARY} {SOURCE} "
             "$(pkg-config --cflags --libs libsystemd)"])

    # A Type=notify unit: systemd-run returns once the example said READY=1, i.e. after
    # its PreserveFd was answered.
    box.run(["systemd-run", "--unit=vmm-c", "--property=Type=notify",
             "--property=NotifyAccess=main", "--quiet", "--", BINARY, "preserve", SESSION,
             "ram", str(SIZE), STATE])
    dev, ino, size = box.run(["cat", STATE]).stdout.split()
    assert int(size) == SIZE
    [row] = installed.sessions()
    assert row[:2] == [SESSION, ESCAPED] and row[4] == 1
    installed.wait_fd_store(1)

    before = box.soft_reboots()
    installed.call("Prepare")
    installed.call("Freeze")
    after = box.soft_reboot(command=["busctl", "--system", "call", *MANAGER, "Reboot"])
    assert after == before + 1
    wait_for(lambda: True if installed.systemctl("is-active", UNIT, check=False) == "active"
             else None, "liveupdated active after the soft-reboot")
    assert installed.prop("State") == "updated"

    back = box.run_unit([BINARY, "retrieve", SESSION, "ram", STATE], check=False)
    assert back.returncode == 0, back.stderr
    assert back.stdout == (f"retrieved {SESSION}/ram at {ESCAPED}: the same inode {ino}, "
                           f"{SIZE} bytes as preserved\n")
    assert dev.isdigit()  # checked by the example itself, with the inode

    installed.call("Finish")
    assert installed.prop("State") == "normal"
    installed.wait_fd_store(0)
