"""A real QEMU guest under the adapter unit (liveupdated-qemu@.service) in a booted
Debian sid container (QEMU 11, TCG): the guest counts in RAM; Prepare, Freeze and Reboot
through busctl; the container reboots (simulated backend) or soft-reboots (fdstore
backend); the guest goes on counting from where it stopped, with no second BOOT line,
and shows a value written into its RAM memfd while no QEMU ran."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from statistics import median
from typing import Any

import pytest

from .container import Container, overlay_root
from .installed import (
    HANDOVER,
    MANAGER,
    Installed,
    build_deb,
    build_wheels,
    guest_python_version,
    logged_event,
    wait_for,
)
from .rootfs import SID, Suite, cached_rootfs, tarball_path, tmpfs

pytestmark = pytest.mark.nspawn

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
SID_QEMU = Suite("sid", (*SID.packages, "qemu-system-x86"))
VM = "counter"
ADAPTER = f"liveupdated-qemu@{VM}.service"
VMS = "/var/lib/vms"
SERIAL = f"{VMS}/{VM}.serial"
TAG_OFFSET = 0x7E04
TAG = 0x5EED1234
LINE = re.compile(r"n=([0-9a-f]{8}) tag=([0-9a-f]{8})")
CONFIG = f"""# The guest of guest/counter.S, software-emulated.
--ram 64M
-- -nodefaults -display none -accel tcg
   -drive file={VMS}/counter.img,format=raw,if=ide
   -chardev file,id=serial0,path={SERIAL},append=on -serial chardev:serial0
"""
SIMULATED = """[Service]
ExecStart=
ExecStart=/usr/lib/liveupdated/bin/liveupdated --bus system --backend simulated \
    --reboot-action "systemctl reboot"
"""
POKE = """
import os, sys
pid, offset, value = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for fd in os.listdir(f"/proc/{pid}/fd"):
    path = f"/proc/{pid}/fd/{fd}"
    if os.readlink(path).startswith("/memfd:guest-ram"):
        ram = os.open(path, os.O_RDWR)
        os.pwrite(ram, value.to_bytes(4, "little"), offset)
        print(os.fstat(ram).st_size)
        break
else:
    sys.exit("no guest-ram memfd")
"""


@pytest.fixture(scope="session")
def qemu_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A bootable sid root with QEMU, from the cache (built once: about a minute)."""
    if subprocess.run(["sh", "-c", "command -v debootstrap"], capture_output=True,
                      check=False).returncode and not tarball_path(SID_QEMU).exists():
        pytest.skip("needs debootstrap: run scripts/nspawn-deps.sh")
    with tmpfs(tmp_path_factory.mktemp("nspawn-sid-qemu") / "root") as root:
        yield cached_rootfs(root, suite=SID_QEMU)


@pytest.fixture(scope="session")
def qemu_deb(qemu_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = build_wheels(tmp_path_factory.mktemp("qemu-wheels"), guest_python_version(qemu_root))
    return build_deb(tmp_path_factory.mktemp("qemu-packages"), wheels, qemu_root)


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("needs binutils (as, ld) on the host to build the guest")
    image = tmp_path_factory.mktemp("guest") / "counter.img"
    subprocess.run([str(REPO / "guest/build.sh"), str(image)], check=True, capture_output=True)
    return image


@pytest.fixture
def qemu_box(qemu_root: Path, qemu_deb: Path, guest_image: Path,
             tmp_path: Path) -> Iterator[Installed]:
    """A booted sid container with liveupdated installed and the VM `counter` configured
    (its unit enabled, not started)."""
    with ExitStack() as stack:
        root = stack.enter_context(overlay_root(qemu_root, tmp_path / "overlay"))
        handover = tmp_path / "handover"
        handover.mkdir(mode=0o700)
        box = Container(root, [(handover, HANDOVER)], log_path=tmp_path / "console.log")
        stack.callback(box.close)
        box.start(60)
        installed = Installed.install(box, qemu_deb, handover)
        box.copy_in(guest_image, f"{VMS}/counter.img")
        # The adapter's unit as the package installs it: nothing copied from the tree.
        assert box.run(["test", "-f", "/usr/lib/systemd/system/liveupdated-qemu@.service"],
                       check=False).returncode == 0
        for page in ("man8/liveupdated-qemu.8.gz", "man8/liveupdated.8.gz"):  # its docs
            assert box.run(["test", "-f", f"/usr/share/man/{page}"], check=False).returncode == 0
        (box.host_path("/etc") / "liveupdated/qemu").mkdir(parents=True, exist_ok=True)
        box.host_path("/etc/liveupdated/qemu").joinpath(f"{VM}.conf").write_text(CONFIG)
        installed.systemctl("daemon-reload")
        # --man=no: the minimal root has no man(1); the pages themselves are checked below.
        verify = box.run(["systemd-analyze", "verify", "--man=no", ADAPTER], check=False)
        assert verify.returncode == 0, verify.stderr
        installed.systemctl("enable", ADAPTER)
        yield installed


def counts(box: Container) -> tuple[list[tuple[int, int]], list[str]]:
    text = box.run(["cat", SERIAL], check=False).stdout
    lines = [line.rstrip("\r") for line in text.split("\n")[:-1]]
    return [(int(m[1], 16), int(m[2], 16)) for m in map(LINE.fullmatch, lines) if m], lines


def wait_count(box: Container, beyond: int, timeout: float = 60) -> list[tuple[int, int]]:
    def past() -> list[tuple[int, int]] | None:
        seen, _ = counts(box)
        return seen if seen and seen[-1][0] > beyond else None

    return wait_for(past, f"the guest counting past {beyond}", timeout)


def adapter_log(installed: Installed, event: str) -> list[dict[str, Any]]:
    """The adapter's events: native journal fields (logs.py) or a JSON line, as logged."""
    out = installed.box.run(["journalctl", "--unit", ADAPTER, "--output", "json",
                             "--no-pager"], check=False).stdout
    entries = [logged_event(json.loads(line)) for line in out.splitlines() if line.strip()]
    return [e for e in entries if e.get("event") == event]


def wait_logged(installed: Installed, event: str, count: int = 1,
                timeout: float = 60) -> dict[str, Any]:
    def logged() -> dict[str, Any] | None:
        found = adapter_log(installed, event)
        return found[-1] if len(found) >= count else None

    return wait_for(logged, f"{event} from {ADAPTER}", timeout)


def journal_tail(installed: Installed) -> str:
    return installed.box.run(["journalctl", "--unit", ADAPTER, "--output", "cat", "--no-pager",
                              "--lines", "30"], check=False).stdout


def adapter(installed: Installed, *props: str) -> dict[str, str]:
    out = installed.systemctl("show", ADAPTER, *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines())


def bare_pauses(installed: Installed) -> list[float]:
    """Five stop/save/quit/start/load/cont cycles of the same guest by a bare QEMU."""
    box = installed.box
    box.copy_in(HERE / "qemu_bare.py", "/opt/liveupdated-tests/qemu_bare.py")
    box.run(["cp", f"{VMS}/counter.img", f"{VMS}/bare.img"])  # the VM's is locked
    out = box.run(["/usr/lib/liveupdated/bin/python", "/opt/liveupdated-tests/qemu_bare.py",
                   f"{VMS}/bare.img", f"{VMS}/bare.serial", "5"], timeout=120).stdout
    pauses: list[float] = json.loads(out.splitlines()[-1])["pauses_ms"]
    return pauses


def update_cycle(installed: Installed, reboot: str) -> dict[str, Any]:
    """Boot the VM, update the host, check the guest went on; what was measured."""
    box = installed.box
    installed.systemctl("start", "liveupdated")
    started = installed.box.run(["systemctl", "start", ADAPTER], check=False)
    assert started.returncode == 0, journal_tail(installed)  # returns once booted and joined
    assert adapter(installed, "ActiveState")["ActiveState"] == "active"
    wait_logged(installed, "joined")
    sessions = installed.sessions()
    assert [(s[0], s[4]) for s in sessions] == [(f"qemu-{VM}", 2)]
    wait_count(box, 10)

    installed.call("Prepare")
    wait_count(box, counts(box)[0][-1][0] + 3)  # the guest runs through the brownout
    freeze_at = time.time()
    installed.call("Freeze")
    saved = wait_logged(installed, "saved")
    wait_logged(installed, "qemu_exited")
    seen, _ = counts(box)
    last = seen[-1][0]
    pid = adapter(installed, "MainPID")["MainPID"]
    poked = box.run(["/usr/lib/liveupdated/bin/python", "-c", POKE, pid, str(TAG_OFFSET),
                     str(TAG)]).stdout
    assert int(poked) == 64 << 20
    time.sleep(0.5)
    assert counts(box)[0][-1][0] == last  # stopped: no QEMU runs

    reboot_call = ["busctl", "--system", "call", *MANAGER, "Reboot"]
    reboot_at = time.time()  # the test's own checks above add ~0.6 s to the pauses
    if reboot == "reboot":
        old_boot = box.boot_id()
        assert box.reboot(command=reboot_call) != old_boot
    else:
        before = box.soft_reboots()
        assert box.soft_reboot(command=reboot_call) == before + 1
    resumed = wait_logged(installed, "resumed", timeout=90)
    assert adapter(installed, "ActiveState")["ActiveState"] == "active"
    after = wait_count(box, last + 10)
    _, lines = counts(box)
    assert lines.count("BOOT") == 1  # one boot, before the update; a rebooted guest fails
    values = [n for n, _ in after]
    assert values == list(range(1, values[-1] + 1))  # no gap, no repeat, across the update
    assert {t for n, t in after if n <= last} == {0}
    assert {t for n, t in after if n > last + 1} == {TAG}  # the poke, read from RAM
    assert installed.prop("State") == "updated"

    installed.call("Finish")
    wait_logged(installed, "joined", count=2)  # back in normal: joined again
    assert [(s[0], s[4]) for s in installed.sessions()] == [(f"qemu-{VM}", 2)]
    wait_count(box, values[-1] + 3)
    return {
        "save_ms": saved["save_ms"],
        "adapter_stop_to_cont_ms": resumed["pause_ms"],
        "freeze_started_to_running_ms": resumed.get("freeze_to_running_ms"),
        "freeze_call_to_running_ms": round((resumed["running_at"] - freeze_at) * 1000, 1),
        "reboot_call_to_running_ms": round((resumed["running_at"] - reboot_at) * 1000, 1),
        "qemu_start_and_load_ms": resumed["start_ms"],
    }


def report(capsys: pytest.CaptureFixture[str], what: str, numbers: dict[str, Any]) -> None:
    with capsys.disabled():
        print(f"\n{what}: {json.dumps(numbers)}")


def test_qemu_guest_across_container_reboot(
    qemu_box: Installed, capsys: pytest.CaptureFixture[str]
) -> None:
    drop_in = qemu_box.box.host_path("/etc/systemd/system/liveupdated.service.d")
    drop_in.mkdir(parents=True, exist_ok=True)  # a user's own drop-in: the package has none
    (drop_in / "simulated.conf").write_text(SIMULATED)
    qemu_box.systemctl("daemon-reload")
    qemu_box.systemctl("restart", "liveupdated")  # started by the package's postinst
    numbers = update_cycle(qemu_box, "reboot")
    assert qemu_box.prop("Backend") == "simulated"
    bare = bare_pauses(qemu_box)
    numbers["bare_qemu_stop_to_cont_ms"] = {"median": median(bare), "all": bare}
    report(capsys, "QEMU guest across a container reboot (simulated backend)", numbers)


def test_qemu_guest_across_soft_reboot(
    qemu_box: Installed, capsys: pytest.CaptureFixture[str]
) -> None:
    numbers = update_cycle(qemu_box, "soft-reboot")
    assert qemu_box.prop("Backend") == "fdstore"
    report(capsys, "QEMU guest across a soft-reboot (fdstore backend)", numbers)
