"""The QEMU adapter (liveupdated.vmm) against a real daemon and a QMP stand-in
(tests/fake_qemu.py): the update cycle, a Cancel, and the refusals (state rejected, no
saved state, RAM missing, QEMU too old). The real QEMU runs in tests/nspawn/test_qemu.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from liveupdated.client import Client
from liveupdated.privatebus import PrivateBus
from liveupdated.vmm.__main__ import arguments
from liveupdated.vmm.qemu import STATE_OFFSET, Header, QemuSpec, parse_size, parse_version
from tests.conftest import Host, make_memfd

FAKE = Path(__file__).with_name("fake_qemu.py")
REPO = FAKE.parents[1]
SESSION = "vm-fake"
COUNTER, TAG = 0x7E00, 0x7E04
LINE = re.compile(r"n=([0-9a-f]{8}) tag=([0-9a-f]{8})")


class Vm:
    """Adapter processes for one VM on the test bus, each run to its end by the test."""

    def __init__(self, bus: PrivateBus, work: Path) -> None:
        self.bus, self.work = bus, work
        self.log = work / "adapter.log"
        self.serial = work / "serial.log"
        self.qemu_log = work / "qemu-commands.log"
        self.adapters: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """An adapter process; `args`: more adapter options (before QEMU's)."""
        argv = [sys.executable, "-m", "liveupdated.vmm", "--name", "fake", "--ram", "1M",
                "--bus", self.bus.address, "--session", SESSION, *args,
                "--qmp", str(self.work / "qmp.sock"), "--qemu", f"{sys.executable} {FAKE}",
                "--", "-chardev", f"file,id=serial0,path={self.serial},append=on"]
        with self.log.open("ab") as log:
            adapter = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO),
                     "FAKE_QEMU_LOG": str(self.qemu_log), **env})
        self.adapters.append(adapter)
        return adapter

    def entries(self, event: str) -> list[dict[str, Any]]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        found = [json.loads(line.split(">", 1)[1]) for line in text.splitlines()
                 if line.startswith("<") and ">{" in line]
        return [e for e in found if e.get("event") == event]

    def wait(self, event: str, count: int = 1, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while len(found := self.entries(event)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return found[-1]

    def counts(self) -> list[tuple[int, int]]:
        text = self.serial.read_text() if self.serial.exists() else ""
        return [(int(m[1], 16), int(m[2], 16))
                for m in map(LINE.fullmatch, text.replace("\r", "").split("\n")) if m]

    def wait_count(self, beyond: int, timeout: float = 20) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while not (seen := self.counts()) or seen[-1][0] <= beyond:
            assert time.monotonic() < deadline, f"no count past {beyond}: {seen[-3:]}"
            time.sleep(0.02)
        return seen

    def poke(self, adapter: subprocess.Popen[bytes], offset: int, data: bytes) -> None:
        for fd in os.listdir(f"/proc/{adapter.pid}/fd"):
            path = f"/proc/{adapter.pid}/fd/{fd}"
            if os.readlink(path).startswith("/memfd:guest-ram"):
                ram = os.open(path, os.O_RDWR)
                os.pwrite(ram, data, offset)
                os.close(ram)
                return
        raise AssertionError("the adapter holds no guest-ram memfd")

    def close(self) -> None:
        for adapter in self.adapters:
            if adapter.poll() is None:
                adapter.kill()
                adapter.wait()


@pytest.fixture
def vm(bus: PrivateBus, tmp_path: Path) -> Iterator[Vm]:
    machine = Vm(bus, tmp_path)
    yield machine
    machine.close()


async def call(bus: PrivateBus, *members: str) -> None:
    async with await Client.connect(bus.address) as client:
        for member in members:
            await client._manager(member)


async def frozen(host: Host, vm: Vm) -> tuple[subprocess.Popen[bytes], int]:
    """Boot the VM under a daemon, Prepare and Freeze: the adapter saved it, QEMU exited."""
    host.start_now()
    adapter = vm.start()
    vm.wait("joined")
    vm.wait_count(5)
    await call(host.bus, "Prepare", "Freeze")
    vm.wait("saved")
    vm.wait("qemu_exited")
    return adapter, vm.counts()[-1][0]


async def rebooted(host: Host, vm: Vm, adapter: subprocess.Popen[bytes]) -> None:
    """Reboot: the daemon writes the handover and exits, the adapter follows it; then the
    next boot's daemon (same state dir, same fd store)."""
    await call(host.bus, "Reboot")
    assert host.daemons[-1].wait() == 0
    assert adapter.wait(20) == 0
    assert vm.entries("handed_over")
    host.start_now()


async def test_the_guest_goes_on_across_the_update(host: Host, vm: Vm) -> None:
    adapter, last = await frozen(host, vm)
    async with await Client.connect(host.bus.address) as client:
        (info,) = await client.list_sessions()
        assert (info.name, info.fd_count) == (SESSION, 2)
    vm.poke(adapter, TAG, (0xFEED).to_bytes(4, "little"))
    await rebooted(host, vm, adapter)
    second = vm.start()
    resumed = vm.wait("resumed")
    assert resumed["pause_ms"] > 0 and resumed["freeze_to_running_ms"] >= resumed["pause_ms"]
    seen = vm.wait_count(last + 5)
    assert [n for n, _ in seen] == list(range(1, seen[-1][0] + 1))
    assert vm.serial.read_text().count("BOOT") == 1
    assert {t for n, t in seen if n <= last} == {0}
    assert {t for n, t in seen if n > last + 1} == {0xFEED}
    await call(host.bus, "Finish")
    vm.wait("joined", count=2)  # back in normal, the VM is protected again
    second.send_signal(signal.SIGTERM)
    assert second.wait(20) == 0


async def test_a_cancel_after_freeze_continues_the_guest(host: Host, vm: Vm) -> None:
    adapter, last = await frozen(host, vm)
    await call(host.bus, "Cancel")
    vm.wait("resumed")
    seen = vm.wait_count(last + 5)
    assert [n for n, _ in seen] == list(range(1, seen[-1][0] + 1))
    assert adapter.poll() is None
    async with await Client.connect(host.bus.address) as client:
        assert [(s.name, s.fd_count) for s in await client.list_sessions()] == [(SESSION, 2)]


async def test_a_rejected_state_never_continues_the_guest(host: Host, vm: Vm) -> None:
    adapter, _ = await frozen(host, vm)
    vm.poke(adapter, COUNTER, bytes(4))  # the stand-in refuses a state over zeroed RAM
    await rebooted(host, vm, adapter)
    assert vm.start().wait(20) == 65
    failed = vm.wait("failed")
    assert "post load hook failed" in failed["error"]
    commands = vm.qemu_log.read_text().split()
    assert commands[-1] != "cont" and "migrate-incoming" in commands
    assert commands.count("cont") == 0


async def session_without_save(host: Host, tokens: tuple[str, ...]) -> None:
    """A session of the VM's name carried across a reboot with no adapter behind it."""
    host.start_now()
    async with await Client.connect(host.bus.address) as client:
        session = await client.create_session(SESSION)
        await session.preserve_fds([(t, make_memfd(1 << 20, b"", name=t), ()) for t in tokens])
        await client.prepare()
        await client.freeze()
        await client.reboot()
    host.daemons[-1].wait()
    host.start_now()


async def test_no_saved_state_is_refused(host: Host, vm: Vm) -> None:
    await session_without_save(host, ("guest-ram", "vm-state"))
    assert vm.start().wait(20) == 65
    assert "no completed save" in vm.wait("failed")["error"]
    assert not vm.qemu_log.exists()  # QEMU never started


async def test_missing_ram_is_refused(host: Host, vm: Vm) -> None:
    await session_without_save(host, ("vm-state",))
    assert vm.start().wait(20) == 66
    assert "no usable guest RAM" in vm.wait("failed")["error"]


def test_an_old_qemu_is_refused(vm: Vm) -> None:
    assert vm.start(FAKE_QEMU_VERSION="7.2.0").wait(20) == 69
    assert "QEMU 7.2.0 is too old" in vm.wait("failed")["error"]


def test_header_roundtrip() -> None:
    fd = make_memfd(1 << 20, b"")
    assert Header.read(fd) is None
    header = Header(64 << 20, "11.1.3", 1.5, 1.25, 3.0)
    header.write(fd)
    assert Header.read(fd) == header
    Header.clear(fd)
    assert Header.read(fd) is None
    assert os.pread(fd, 8, STATE_OFFSET) == bytes(8)  # QEMU's stream is not touched
    os.close(fd)


def test_command_line(tmp_path: Path) -> None:
    config = tmp_path / "vm.conf"
    config.write_text("--ram 2G  # comment\n-- -accel tcg\n  -drive file=a.img\n")
    args = arguments(["--name", "vm", "--config", str(config), "--", "-smp", "2"])
    assert (args.ram, args.qemu_args) == (2 << 30, ["-accel", "tcg", "-drive", "file=a.img",
                                                    "-smp", "2"])
    spec = QemuSpec(["qemu"], 64 << 20, "q35", ["-x"], tmp_path / "qmp")
    argv = spec.argv(7, incoming=True)
    assert "memory-backend-file,id=lu-ram,size=67108864,share=on,mem-path=/proc/self/fd/7" in argv
    assert argv[argv.index("-machine") + 1] == "q35,memory-backend=lu-ram"
    assert argv[-3:] == ["-incoming", "defer", "-x"]
    assert "-incoming" not in spec.argv(7, incoming=False)
    assert parse_size("64M") == 64 << 20 and parse_size("1GiB") == 1 << 30
    assert parse_version("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)") == (11, 1, 3)
