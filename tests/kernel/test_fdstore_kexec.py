"""The fdstore backend across a real kexec: systemd 262 (Debian sid) as PID 1 on the LUO
kernel carries the VMMs' memfds in liveupdated's fd store (FileDescriptorStorePreserve=yes)
through /dev/liveupdate, which liveupdated itself never opens.

    make test-kernel   (= .venv/bin/python -m pytest -q -m kernel tests/kernel)

One QEMU guest boots the LUO kernel from a sid root with liveupdated installed from its
.deb (sid_image.py); tests/kernel/guest_fdstore.py starts two VMM units that hand memfds
over, checks that `auto` picked the fdstore backend, drives Prepare, Freeze and Reboot
with busctl (--reboot-action kexec: liveupdated asks systemd for kexec.target, a kernel
loaded first), and in the next boot checks the evidence of the new boot, every fd, the
unrelated keeper.service's store, /dev/liveupdate free, and the kernel's sessions after
Finish, pipelined with each VM's Session.Finish. Timings go to the terminal summary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .conftest import TIMINGS
from .qemu import Guest
from .test_kexec import (
    BOOT_ATTEMPTS,
    BOOT_TIMEOUT,
    CYCLE_TIMEOUT,
    Stalled,
    finish_race_answered,
    first_boot,
)

pytestmark = pytest.mark.kernel

MODE = "fdstore, systemctl kexec by PID 1"
PRESERVED = "Preserved fd stores in LUO session"  # systemd-shutdown, just before the kexec


def test_systemd_carries_the_fd_stores_across_a_real_kexec(
    luo_kernel: Path, sid_guest_image: Path, tmp_path: Path
) -> None:
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        console = tmp_path / f"console-{attempt}.log"
        with Guest(luo_kernel / "bzImage", sid_guest_image, console) as guest:
            try:
                first = first_boot(guest)
            except Stalled:
                if attempt == BOOT_ATTEMPTS:
                    raise
                continue
            assert first.fields["stage"] == "before", first.fields
            result = guest.event("result", BOOT_TIMEOUT + CYCLE_TIMEOUT)
            guest.wait_for(lambda g: None if g.running() else True, "poweroff", 120)
        break
    (tmp_path / "result.json").write_text(json.dumps(result.fields, indent=2))
    assert "error" not in result.fields, f"{result.fields['error']} (console: {console})"

    events = {e.name: e for e in guest.events()}  # the last of each name
    frozen, rebooting, fds_back = events["frozen"], events["rebooting"], events["fds_back"]
    preserved = guest.first_line_after(rebooting.at, PRESERVED)
    new_kernel = guest.first_line_after(rebooting.at, "Linux version")
    kho = guest.first_line_after(rebooting.at, "KHO: found kexec handover data")
    TIMINGS[f"[{MODE}] first boot to test start, s"] = first.at - guest.started
    TIMINGS[f"[{MODE}] Freeze to every fd back (blackout), s"] = fds_back.at - frozen.at
    TIMINGS[f"[{MODE}] Reboot() to fds back, s"] = fds_back.at - rebooting.at
    TIMINGS[f"[{MODE}] Freeze to Reboot() (kernel loaded), s"] = rebooting.at - frozen.at
    if new_kernel is not None:
        ready = guest.first_line_after(new_kernel.at, "Started liveupdated.servic")
        TIMINGS[f"[{MODE}] Reboot() to new kernel, s"] = new_kernel.at - rebooting.at
        if ready is not None:
            TIMINGS[f"[{MODE}] new kernel to liveupdated ready, s"] = ready.at - new_kernel.at
        TIMINGS[f"[{MODE}] new kernel to liveupdated updated, s"] = (
            events["updated"].at - new_kernel.at)

    fields = result.fields
    assert int(re.match(r"\d+", first.fields["systemd"])[0]) >= 261, first.fields  # type: ignore[index]
    assert preserved is not None, f"systemd-shutdown did not preserve the fd stores ({console})"
    assert kho is not None, "the new kernel found no KHO data"
    # Evidence of the new boot, as liveupdated saw it: KExecCount grew, the boot id changed.
    assert fields["boot_changed"], "the guest did not boot a new kernel"
    previous, now = fields["kexecs"]
    assert now == previous + 1, fields["kexecs"]
    found = fields["handover_found"]
    assert found is not None, "liveupdated logged no handover_found"
    assert found["kexecs"] == now, found
    assert fields["backend"] == "fdstore"
    # Every fd byte-exact: content, size, seals, position (the name and holes are not
    # carried by LUO: reported in not_carried).
    assert fields["fds"] == ["vm-k1/guest-ram", "vm-k1/vm-state", "vm-k2/guest-ram"]
    assert fields["mismatches"] == {}
    # The unrelated unit's store came back through the same kexec.
    keeper = fields["keeper"]
    assert [k["from_store"] for k in keeper] == [False, True], keeper
    assert keeper[0]["data"] == keeper[1]["data"]
    # /dev/liveupdate is PID 1's: liveupdated never held it, and holds no session after.
    assert fields["holders_updated"] == [] and fields["holders_finished"] == []
    assert fields["stored_after_finish"] == 1  # only the daemon's journal watermark
    assert fields["kernel_sessions_left"] == {}
    finish_race_answered(fields)
