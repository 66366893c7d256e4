"""The guest's disk: the cached Debian root of the nspawn tests, liveupdated installed in it
by packaging/install.sh from wheels built on the host, the LUO kernel for the kexec and the
guest test (guest.py, luo-test.service); written to an ext4 image with `mkfs.ext4 -d`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.nspawn.rootfs import cached_rootfs, tmpfs

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = "/opt/luo-test"
IMAGE_SIZE = "2G"
ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8"]

TEST_UNIT = f"""\
[Unit]
Description=liveupdated kexec test (tests/kernel/guest.py)
Wants=liveupdated.service
After=liveupdated.service dbus.service

[Service]
Type=simple
ExecStart=/usr/lib/liveupdated/bin/python {GUEST_DIR}/guest.py run
StandardOutput=journal

[Install]
WantedBy=multi-user.target
"""

# The way the daemon reboots comes from the kernel command line: luotest.reboot_action=
# direct makes it the kexec call itself (no shutdown: the daemon, still holding the
# sessions, runs it); otherwise the default, `systemctl kexec`.
ENV_UNIT = f"""\
[Unit]
Description=liveupdated kexec test: daemon arguments from the kernel command line
DefaultDependencies=no
Before=liveupdated.service

[Service]
Type=oneshot
ExecStart=/bin/sh {GUEST_DIR}/env.sh
"""
ENV_SCRIPT = """\
case " $(cat /proc/cmdline) " in
    *" luotest.reboot_action=direct "*)
        action="/usr/lib/liveupdated/bin/python -m liveupdated.backends.luo_uapi kexec" ;;
    *) action=auto ;;
esac
echo "LUO_TEST_REBOOT_ACTION='$action'" >/run/luo-test.env
"""
DAEMON_DROP_IN = """\
[Unit]
Wants=luo-test-env.service
After=luo-test-env.service

[Service]
EnvironmentFile=/run/luo-test.env
ExecStart=
ExecStart=/usr/lib/liveupdated/bin/liveupdated --bus system \\
    --reboot-action=${LUO_TEST_REBOOT_ACTION}
"""

# Until daemon.make_backend builds the kernel backend itself (see the report of the kernel
# backend change): the installed daemon gets it through this start-up hook. Applied only
# when the installed daemon.py does not mention KernelBackend.
SHIM = """\
import liveupdated.daemon as _daemon
from liveupdated.backends.kernel import KernelBackend as _KernelBackend

_original = _daemon.make_backend


def _make_backend(config):
    if config.resolved_backend() == "kernel":
        return _KernelBackend()
    return _original(config)


_daemon.make_backend = _make_backend
"""

MASKED = ("serial-getty@ttyS0.service", "getty@tty1.service", "systemd-timesyncd.service",
          "e2scrub_reap.service")


def run(argv: list[str], **kwargs: object) -> str:
    result = subprocess.run(argv, check=False, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited with {result.returncode}:\n"
                           f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return str(result.stdout)


def build_image(work: Path, kernel: Path) -> Path:
    """A bootable ext4 image of the guest in `work`; `kernel` is the bzImage to kexec."""
    wheels = work / "wheels"
    run([str(REPO / "packaging/build-wheels.sh"), str(wheels)])
    image = work / "guest.img"
    with tmpfs(work / "root") as root:
        cached_rootfs(root)
        _install(root, wheels)
        _add_test(root, kernel)
        run(["mkfs.ext4", "-q", "-F", "-L", "luo-root", "-d", str(root), str(image),
             IMAGE_SIZE])
    return image


def _install(root: Path, wheels: Path) -> None:
    for mount_point in ("mnt/src", "mnt/wheels"):
        (root / mount_point).mkdir(parents=True, exist_ok=True)
    script = (
        'mount --bind -o ro "$1" "$3/mnt/src" && mount --bind -o ro "$2" "$3/mnt/wheels" && '
        'mount -t proc proc "$3/proc" && mount --bind /dev "$3/dev" && '
        'exec chroot "$3" "${@:4}"'
    )
    run(["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", script,
         "install", str(REPO), str(wheels), str(root), *ENV,
         "/mnt/src/packaging/install.sh", "--wheels", "/mnt/wheels"])
    run(["systemctl", f"--root={root}", "enable", "liveupdated.service"])
    daemon = next((root / "usr/lib/liveupdated/lib").glob("python3*/site-packages/"
                                                          "liveupdated/daemon.py"))
    if "KernelBackend" not in daemon.read_text():
        (daemon.parent.parent / "luo_test_shim.py").write_text(SHIM)
        (daemon.parent.parent / "luo_test_shim.pth").write_text("import luo_test_shim\n")


def _add_test(root: Path, kernel: Path) -> None:
    (root / GUEST_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / GUEST_DIR.lstrip("/") / "guest.py").write_bytes(
        Path(__file__).with_name("guest.py").read_bytes())
    (root / "boot").mkdir(exist_ok=True)
    (root / "boot/vmlinuz-luo").write_bytes(kernel.read_bytes())
    units = root / "etc/systemd/system"
    (units / "luo-test.service").write_text(TEST_UNIT)
    (units / "luo-test-env.service").write_text(ENV_UNIT)
    (root / GUEST_DIR.lstrip("/") / "env.sh").write_text(ENV_SCRIPT)
    (units / "liveupdated.service.d").mkdir(exist_ok=True)
    (units / "liveupdated.service.d/luo-test.conf").write_text(DAEMON_DROP_IN)
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,relatime 0 1\n")
    run(["systemctl", f"--root={root}", "enable", "luo-test.service"])
    run(["systemctl", f"--root={root}", "mask", *MASKED])
