"""`liveupdatectl demo`: a whole live update on a private bus, with its timeline.

A VMM hands over a sparse memfd of guest memory, the host prepares, freezes and
reboots (a simulated kexec), a new daemon starts, and the VMM gets the memfd back and
checks it against what it had: content, size, seals, name and sparseness.
"""

import asyncio
import fcntl
import hashlib
import json
import math
import mmap
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from liveupdated.client import Client
from liveupdated.fds import memfd
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
CHUNK = 1 << 20


@dataclass
class Timeline:
    start: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    rows: list[tuple[str, float, float]] = field(default_factory=list)

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.rows.append((phase, (now - self.start) * 1e3, (now - self.last) * 1e3))
        self.last = now


MIN_SIZE = 4096  # one page
MAX_SIZE = 1 << 40  # 1 TiB: sparse, but a 64th of it is written


def human_size(size: int) -> str:
    """`4 KiB`, `512 MiB`, `1.5 GiB`: the largest unit that keeps a whole or one-decimal
    number (`size >> 20` said "0 MiB" of 4K)."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift:
            value = size / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"


def parse_size(text: str) -> int:
    """`512M`, `1G`, `1GiB`, `4096`: bytes. ValueError for anything else."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if text and text[-1] in units:
        text, scale = text[:-1], units[text[-1]]
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite size: {text!r}")
    return int(value * scale)


def make_guest_memory(size: int, seed: int = 7) -> int:
    """A sealed sparse memfd with 1 MiB of random data in every 64th MiB or so."""
    fd = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    rng = random.Random(seed)
    slots = max(1, size // (64 * CHUNK))
    for slot in range(slots):
        base = slot * 64 * CHUNK
        chunks = max(1, min(63, (size - base) // CHUNK))  # a small memory: its start
        offset = base + rng.randrange(0, chunks) * CHUNK
        os.pwrite(fd, rng.randbytes(min(CHUNK, size - offset)), offset)
    os.lseek(fd, 4096, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


@dataclass(frozen=True)
class Fingerprint:
    """What must survive the update, including a digest of every data extent."""

    size: int
    seals: int
    name: str | None
    position: int
    extents: list[tuple[int, int]]
    sha256: str

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length in self.extents)


def fingerprint(fd: int) -> Fingerprint:
    size = os.fstat(fd).st_size
    extents = memfd.data_extents(fd, size)
    digest = hashlib.sha256()
    if size:
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
            for start, length in extents:
                digest.update(view[start : start + length])
    return Fingerprint(
        size=size,
        seals=memfd.seals_of(fd),
        name=memfd.memfd_name(os.readlink(f"/proc/self/fd/{fd}")),
        position=os.lseek(fd, 0, os.SEEK_CUR),
        extents=extents,
        sha256=digest.hexdigest(),
    )


@dataclass
class Outcome:
    before: Fingerprint | None = None
    after: Fingerprint | None = None
    old_exit: int = -1
    freeze_done: float = 0.0
    blackout_ms: float = 0.0
    daemon_blackout_usec: int = 0
    final_state: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.before is not None
            and self.before == self.after
            and self.old_exit == 0
            and self.final_state == "normal"
        )


async def _old_boot(bus: PrivateBus, state: Path, log: IO[bytes], size: int,
                    timeline: Timeline, outcome: Outcome) -> None:
    with DaemonProcess(bus.address, state, "--backend", "simulated", log=log) as old:
        timeline.mark("liveupdated ready")
        guest = make_guest_memory(size)
        outcome.before = fingerprint(guest)
        timeline.mark(f"VMM made {human_size(size)} guest memory")
        async with await Client.connect(bus.address) as vmm:
            session = await vmm.create_session("demo-vm")
            await session.preserve_fd("guest-ram", guest)
            timeline.mark("VMM handed over its memfd")
            await vmm.prepare()
            timeline.mark("Prepare (brownout)")
            await vmm.freeze()
            outcome.freeze_done = time.monotonic()
            timeline.mark("Freeze (blackout starts)")
            await vmm.reboot()
        os.close(guest)  # the old VMM process is gone with the old kernel
        outcome.old_exit = old.wait()
        timeline.mark(f"Reboot: handover written, daemon exited {outcome.old_exit}")


async def _new_boot(bus: PrivateBus, state: Path, log: IO[bytes], timeline: Timeline,
                    outcome: Outcome) -> None:
    with DaemonProcess(bus.address, state, "--backend", "simulated", log=log):
        timeline.mark("new boot: liveupdated ready")
        async with await Client.connect(bus.address) as vmm:
            session = await vmm.retrieve_session("demo-vm")
            restored = await session.retrieve_fd("guest-ram")
            outcome.blackout_ms = (time.monotonic() - outcome.freeze_done) * 1e3
            timeline.mark("VMM got its memfd back (blackout ends)")
            outcome.after = fingerprint(restored)
            os.close(restored)
            timeline.mark("VMM verified content, size, seals, name, holes")
            outcome.daemon_blackout_usec = int(await vmm.property("LastBlackoutUSec"))
            await vmm.finish()
            outcome.final_state = await vmm.state()
            timeline.mark(f"Finish: state {outcome.final_state}")


async def run_demo(size: int | str = "1G", as_json: bool = False) -> int:
    """The whole update; 0 if the memfd came back byte-exact, else 4."""
    if isinstance(size, str):
        size = parse_size(size)
    timeline = Timeline()
    outcome = Outcome()
    with tempfile.TemporaryDirectory(prefix="liveupdated-demo-") as tmp:
        root = Path(tmp)
        with (root / "daemon.log").open("ab") as log, PrivateBus(root / "bus") as bus:
            timeline.mark("private bus up")
            await _old_boot(bus, root / "state", log, size, timeline, outcome)
            await _new_boot(bus, root / "state", log, timeline, outcome)
    _report(outcome, timeline, size, as_json)
    return 0 if outcome.ok else 4


def _report(outcome: Outcome, timeline: Timeline, size: int, as_json: bool) -> None:
    assert outcome.before is not None
    wanted = asdict(outcome.before)
    got = asdict(outcome.after) if outcome.after else {}
    report = {
        "ok": outcome.ok,
        "size_bytes": size,
        "data_bytes": outcome.before.data_bytes,
        "blackout_ms": round(outcome.blackout_ms, 1),
        "daemon_blackout_ms": round(outcome.daemon_blackout_usec / 1e3, 1),
        "phases": [{"phase": p, "at_ms": round(a, 1), "took_ms": round(d, 1)}
                   for p, a, d in timeline.rows],
        "mismatch": {k: [wanted[k], got.get(k)] for k in wanted if wanted[k] != got.get(k)},
    }
    if as_json:
        print(json.dumps(report))
        return
    print(f"liveupdated demo: {human_size(size)} sparse memfd, "
          f"{human_size(outcome.before.data_bytes)} of data, seals "
          f"{outcome.before.seals:#x}\n")
    print(f"{'at ms':>9}  {'took ms':>9}  phase")
    for phase, at, took in timeline.rows:
        print(f"{at:9.1f}  {took:9.1f}  {phase}")
    print(f"\nblackout (Freeze to memfd back): {outcome.blackout_ms:.1f} ms "
          f"(the daemon's LastBlackoutUSec: {outcome.daemon_blackout_usec / 1e3:.1f} ms)")
    print("verification:", "OK, byte-exact" if outcome.ok else f"FAILED {report['mismatch']}")


def main() -> None:
    raise SystemExit(asyncio.run(run_demo()))
