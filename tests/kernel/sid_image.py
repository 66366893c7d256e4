"""The disk of the sid guest (systemd 262 as PID 1): the cached Debian sid root of the
nspawn tests, liveupdated installed from the .deb built for sid (its venv on sid's own
python3, as tests/nspawn builds it), the unrelated fd store keeper of tests/nspawn, the LUO
kernel for the kexec and the guest test (guest_fdstore.py, luo-fdstore-test.service);
written to an ext4 image with `mkfs.ext4 -d`."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.nspawn.installed import build_deb, build_wheels, guest_python_version
from tests.nspawn.rootfs import SID, cached_rootfs, tmpfs

from .image import ENV, GUEST_DIR, IMAGE_SIZE, MASKED, REPO, run

NSPAWN = REPO / "tests" / "nspawn"
KEEPER_DIR = "/opt/liveupdated-tests"

TEST_UNIT = f"""\
[Unit]
Description=liveupdated fdstore kexec test (tests/kernel/guest_fdstore.py)
Wants=liveupdated.service keeper.service
# Not after liveupdated: like a VMM waiting for it, the test starts (Python under TCG takes
# seconds) while the daemon does, and polls its State.
After=dbus.service keeper.service

[Service]
Type=simple
ExecStart=/usr/lib/liveupdated/bin/python {GUEST_DIR}/guest_fdstore.py run
StandardOutput=journal

[Install]
WantedBy=multi-user.target
"""

# The reboot action asked of systemd: its KExec (kexec.target), PID 1 holding the fds.
DAEMON_DROP_IN = """\
[Service]
ExecStart=
ExecStart=/usr/lib/liveupdated/bin/liveupdated --bus system --reboot-action=kexec
"""


def build_sid_image(work: Path, kernel: Path) -> Path:
    """A bootable ext4 image of the sid guest in `work`; `kernel` is the bzImage to kexec."""
    image = work / "guest-sid.img"
    with tmpfs(work / "root") as root:
        cached_rootfs(root, suite=SID)
        wheels = build_wheels(work / "wheels", guest_python_version(root))
        deb = build_deb(work / "packages", wheels, root)
        _install(root, deb)
        _add_test(root, kernel)
        run(["mkfs.ext4", "-q", "-F", "-L", "luo-root", "-d", str(root), str(image),
             IMAGE_SIZE])
    return image


def _install(root: Path, deb: Path) -> None:
    """dpkg -i in a chroot: every dependency is in the root already; no systemd runs there,
    so the postinst only enables the unit."""
    shutil.copy(deb, root / "var/tmp" / deb.name)
    script = ('mount -t proc proc "$1/proc" && mount --bind /dev "$1/dev" && '
              'exec chroot "$1" "${@:2}"')
    run(["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", script,
         "install", str(root), *ENV, "dpkg", "--force-unsafe-io", "-i",
         f"/var/tmp/{deb.name}"])
    (root / "var/tmp" / deb.name).unlink()
    run(["systemctl", f"--root={root}", "enable", "liveupdated.service"])


def _add_test(root: Path, kernel: Path) -> None:
    guest_dir = root / GUEST_DIR.lstrip("/")
    guest_dir.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    for name in ("guest.py", "guest_fdstore.py"):
        (guest_dir / name).write_bytes((here / name).read_bytes())
    keeper_dir = root / KEEPER_DIR.lstrip("/")
    keeper_dir.mkdir(parents=True, exist_ok=True)
    (keeper_dir / "keeper.py").write_bytes((NSPAWN / "keeper.py").read_bytes())
    (root / "boot").mkdir(exist_ok=True)
    (root / "boot/vmlinuz-luo").write_bytes(kernel.read_bytes())
    units = root / "etc/systemd/system"
    (units / "keeper.service").write_bytes((NSPAWN / "keeper.service").read_bytes())
    (units / "luo-fdstore-test.service").write_text(TEST_UNIT)
    (units / "liveupdated.service.d").mkdir(exist_ok=True)
    (units / "liveupdated.service.d/luo-test.conf").write_text(DAEMON_DROP_IN)
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,relatime 0 1\n")
    run(["systemctl", f"--root={root}", "enable", "luo-fdstore-test.service",
         "keeper.service"])
    run(["systemctl", f"--root={root}", "mask", *MASKED])
