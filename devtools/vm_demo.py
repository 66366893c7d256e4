"""make demo-vm: a QEMU guest that counts in RAM, carried across a simulated kexec.

  python devtools/vm_demo.py --root SIDROOT [--seconds S]

On a private bus: liveupdated (simulated backend, `--reboot-action exit`) and the QEMU
adapter running QEMU from SIDROOT (guest/qemu-in-root.sh; guest/sid-root.sh builds it).
The guest boots and counts; Prepare, Freeze (the adapter stops and saves the guest),
a value is written into the guest's RAM memfd while no QEMU runs, Reboot: the daemon
writes the handover and exits. A new daemon (the next boot: same state dir, same fd
store) and a new adapter resume the guest, which goes on counting from where it
stopped and shows the value written. Needs root (the QEMU wrapper mounts and chroots).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liveupdated.client import Client
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess, Notifications

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "guest"
COUNTER, TAG = 0x7E00, 0x7E04
RAM = "64M"
LINE = re.compile(r"n=([0-9a-f]{8}) tag=([0-9a-f]{8})")


def serial_lines(path: Path) -> list[str]:
    """The complete lines of the guest's serial log."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line.rstrip("\r") for line in text.split("\n")[:-1]]


def counts(lines: list[str]) -> list[tuple[int, int]]:
    return [(int(m[1], 16), int(m[2], 16)) for m in map(LINE.fullmatch, lines) if m]


@dataclass
class Cycle:
    """One host, one VM: the processes of the demo and of the host-side test."""

    root: Path
    work: Path
    session: str = "qemu-demo"
    adapters: list[subprocess.Popen[bytes]] = field(default_factory=list)
    daemons: list[DaemonProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)
        self.image = self.work / "counter.img"
        subprocess.run([str(GUEST / "build.sh"), str(self.image)], check=True,
                       stdout=subprocess.DEVNULL)
        self.serial = self.work / "serial.log"
        self.adapter_log = self.work / "adapter.log"
        self.daemon_log = (self.work / "daemon.log").open("ab")
        self.bus = PrivateBus(self.work / "bus").start()
        self.store = Notifications()

    def start_daemon(self) -> DaemonProcess:
        daemon = DaemonProcess(self.bus.address, self.work / "state", "--backend",
                               "simulated", log=self.daemon_log, notifications=self.store)
        self.daemons.append(daemon)
        return daemon.start()

    def adapter_argv(self) -> list[str]:
        return [
            sys.executable, "-m", "liveupdated.vmm", "--name", "demo", "--ram", RAM,
            "--bus", self.bus.address, "--session", self.session,
            "--qmp", str(self.work / "qmp.sock"),
            "--qemu", f"{GUEST / 'qemu-in-root.sh'} {self.root} {self.work} --",
            "--", "-nodefaults", "-display", "none", "-accel", "tcg",
            "-drive", f"file={self.image},format=raw,if=ide",
            "-chardev", f"file,id=serial0,path={self.serial},append=on",
            "-serial", "chardev:serial0",
        ]

    def start_adapter(self) -> subprocess.Popen[bytes]:
        with self.adapter_log.open("ab") as log:
            adapter = subprocess.Popen(self.adapter_argv(), stdout=log, stderr=log,
                                       stdin=subprocess.DEVNULL,
                                       env={**os.environ, "PYTHONPATH": str(REPO)})
        self.adapters.append(adapter)
        return adapter

    def logged(self, event: str) -> list[dict[str, Any]]:
        """The adapters' log entries of `event`."""
        found = []
        for line in self.adapter_log.read_text(errors="replace").splitlines():
            if line.startswith("<") and ">{" in line:
                entry = json.loads(line.split(">", 1)[1])
                if entry.get("event") == event:
                    found.append(entry)
        return found

    def wait_logged(self, event: str, count: int = 1, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while len(found := self.logged(event)) < count:
            adapter = self.adapters[-1]
            if adapter.poll() is not None and adapter.returncode != 0:
                raise RuntimeError(f"the adapter exited with {adapter.returncode}:\n"
                                   f"{self.adapter_log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} from the adapter in {timeout}s:\n"
                                   f"{self.adapter_log.read_text()[-3000:]}")
            time.sleep(0.05)
        return found[-1]

    def wait_counting(self, beyond: int, timeout: float = 60) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while not (seen := counts(serial_lines(self.serial))) or seen[-1][0] <= beyond:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest did not count past {beyond} in {timeout}s: "
                                   f"{serial_lines(self.serial)[-5:]}")
            time.sleep(0.05)
        return seen

    def poke(self, pid: int, value: int) -> None:
        """Write `value` at the guest's TAG word, through the adapter's RAM memfd."""
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with_path = f"/proc/{pid}/fd/{fd}"
            try:
                target = os.readlink(with_path)
            except OSError:
                continue
            if target.startswith("/memfd:guest-ram"):
                ram = os.open(with_path, os.O_RDWR)
                try:
                    os.pwrite(ram, value.to_bytes(4, "little"), TAG)
                finally:
                    os.close(ram)
                return
        raise RuntimeError(f"process {pid} holds no guest-ram memfd")

    async def manager(self, *calls: str) -> float:
        """Call Manager methods in order; the wall clock of the last call's start."""
        started = 0.0
        async with await Client.connect(self.bus.address) as client:
            for member in calls:
                started = time.time()
                await client._manager(member)
        return started

    def close(self) -> None:
        for adapter in self.adapters:
            if adapter.poll() is None:
                adapter.terminate()
                try:
                    adapter.wait(20)
                except subprocess.TimeoutExpired:
                    adapter.kill()
                    adapter.wait()
        for daemon in self.daemons:
            daemon.kill()
        self.store.close()
        self.bus.stop()
        self.daemon_log.close()


@dataclass
class Result:
    last_before: int  # the counter's last complete line before the stop
    after: list[tuple[int, int]]  # the lines printed after the resume
    boots: int  # BOOT lines in the serial log
    resumed: dict[str, Any]  # the new adapter's "resumed" log entry (its pauses)
    freeze_to_running_ms: float  # from the Freeze call to the guest continued


def update_cycle(cycle: Cycle, tag: int, say: Any = print) -> Result:
    """Boot, count, update with a poke while no QEMU runs, resume; what was seen."""
    cycle.start_daemon()
    first = cycle.start_adapter()
    cycle.wait_logged("joined")
    cycle.wait_counting(20)
    say(f"the guest counts: {serial_lines(cycle.serial)[-1]}")
    freeze_at = asyncio.run(cycle.manager("Prepare", "Freeze"))
    saved = cycle.wait_logged("saved")
    say(f"Prepare, Freeze: the adapter stopped the guest, state saved in "
        f"{saved['save_ms']} ms ({saved['state_bytes']} bytes)")
    cycle.wait_logged("qemu_exited")
    last_before = counts(serial_lines(cycle.serial))[-1][0]
    cycle.poke(first.pid, tag)
    say(f"QEMU exited; last line {last_before:08x}; wrote tag {tag:08x} into the RAM memfd")
    asyncio.run(cycle.manager("Reboot"))
    cycle.daemons[-1].wait()
    first.wait(30)
    say("Reboot: the daemon wrote the handover and exited (the simulated kexec)")
    cycle.start_daemon()
    cycle.start_adapter()
    resumed = cycle.wait_logged("resumed")
    say(f"a new daemon and a new adapter: the guest continues, pause {resumed['pause_ms']} ms")
    seen = cycle.wait_counting(last_before + 20)
    asyncio.run(cycle.manager("Finish"))
    cycle.wait_logged("joined", count=2)
    lines = serial_lines(cycle.serial)
    after = [c for c in seen if c[0] > last_before]
    result = Result(last_before, after, lines.count("BOOT"), resumed,
                    round(resumed["running_at"] * 1000 - freeze_at * 1000, 1))
    say(f"the guest goes on: {lines[-1]} (BOOT lines: {result.boots}); Freeze to running "
        f"again {result.freeze_to_running_ms} ms; Finish, and the adapter joined again")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="a root with QEMU >= 8.2")
    parser.add_argument("--work", type=Path, help="where logs and sockets go (a new dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="liveupdated-demo-vm-"))
    cycle = Cycle(args.root, work)
    try:
        result = update_cycle(cycle, tag=0x600DF00D)
    finally:
        cycle.close()
    ok = (result.boots == 1 and result.after and result.after[0][0] == result.last_before + 1
          and result.after[-1][1] == 0x600DF00D)
    print(f"{'OK' if ok else 'FAILED'}: serial log, adapter and daemon logs in {work}")
    sys.exit(0 if ok else 4)


if __name__ == "__main__":
    main()
