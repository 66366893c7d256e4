"""Benchmarks of liveupdated against baselines measured in the same run: the
performance targets of docs/DESIGN.md §5.

`bench/run.py [--quick] [--json]` prints a table; with --json, one JSON object last.
"""

import argparse
import asyncio
import compileall
import dataclasses
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bare_service import NAME as BARE_NAME
from bare_service import PATH as BARE_PATH
from bare_service import RAW_NAME as BARE_RAW_NAME
from dbus_fast import Message
from dbus_fast.aio import MessageBus
from guestmem import Layout, Small, close_all

import liveupdated
from liveupdated.client import Client
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess, Notifications

BENCH = Path(__file__).resolve().parent
MIB, GIB = 1 << 20, 1 << 30
CONCURRENCY = 32  # calls in flight; thousands would fill the client's socket send buffer
FDS_PER_SESSION = 128  # the kernel's limit per session: 79 sessions for 10,000 fds
BATCH = 16  # fds per PreserveFds: dbus-daemon's default limit of fds per message



@dataclass(frozen=True)
class Sizes:
    repeats: int  # of each scenario
    restarts: int  # daemon restarts with 10,000 fds, each beside a bare import
    preserve_calls: int  # timed against the bare method; the daemon then goes on to HELD
    handover_sessions: int  # x 4 memfds
    handover: tuple[int, int, int]  # memfd size, chunk size, chunks
    blackout: tuple[int, int, int]  # the same, for 64 VMs x 4 memfds
    retrieve: tuple[int, ...]  # fds handed over and back, FDS_PER_VM per VM (one client each)


QUICK = Sizes(1, 3, 2_000, 64, (1 * MIB, 256 << 10, 1), (16 * MIB, 256 << 10, 1), (2_000,))
FULL = Sizes(3, 7, 5_000, 256, (16 * MIB, MIB, 4), (256 * MIB, MIB, 8), (2_000, 10_000))
SPARSE = (64 * GIB, MIB, 64)
HELD = 10_000  # fds held for the RSS and restore measures
FDS_PER_VM = 100  # the retrieve scenario's memfds per VM, 4-16 KiB each


class Results:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.units: dict[str, str] = {}

    def add(self, name: str, value: float, unit: str) -> float:
        self.samples.setdefault(name, []).append(value)
        self.units[name] = unit
        return value

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {"median": self.median(name), "min": min(v), "max": max(v), "n": len(v)}
            for name, v in self.samples.items()
        }


Target = tuple[str, str, Callable[[float], bool], str]  # key, description, is it met?, target
TARGETS: list[Target] = [
    ("preserve_ratio", "PreserveFd rate / bare fd method", lambda v: v >= 0.7, ">= 0.7"),
    ("preserve_batch_ratio", "fds/s by PreserveFds / bare method", lambda v: v >= 0.7, ">= 0.7"),
    ("handover_ratio", "handover copy / cp --sparse=always", lambda v: v >= 0.7, ">= 0.7"),
    ("sparse_64g_s", "64 GiB sparse memfd carried", lambda v: v < 0.5, "well under 1 s"),
    ("restore_ratio", "start to READY=1 / bare import", lambda v: v <= 2, "<= 2"),
    ("retrieve_ratio", "RetrieveFd / PreserveFd fds/s, 2,000", lambda v: v >= 0.7, ">= 0.7"),
    ("retrieve_10k_ratio", "the same, 10,000 fds (full run)", lambda v: v >= 0.7, ">= 0.7"),
    ("blackout_ratio", "blackout / cp out+back + start", lambda v: v <= 1.5, "<= 1.5"),
    ("rss_mib_10k", "daemon RSS holding 10,000 fds", lambda v: v <= 64, "<= 64 MiB"),
]


def raise_fd_limit(wanted: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # above the hard limit only with CAP_SYS_RESOURCE
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, wanted), max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def since(start: float) -> float:
    return time.perf_counter() - start


async def drive(count: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Seconds to make `count` calls with CONCURRENCY of them in flight."""
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return since(start)


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return since(started)


def start_bare_service(address: str, stack: ExitStack, *mode: str) -> int:
    """The baseline's own process, on the same bus; stopped when `stack` closes."""
    bare = subprocess.Popen([sys.executable, str(BENCH / "bare_service.py"), address, *mode],
                            stdout=subprocess.PIPE)

    def stop() -> None:
        bare.terminate()
        bare.wait(10)
        if bare.stdout is not None:
            bare.stdout.close()

    stack.callback(stop)
    if bare.stdout is None or bare.stdout.readline() != b"ready\n":
        raise RuntimeError("the bare dbus-fast service did not start")
    return bare.pid


def cpu_s(pid: int, task: str = "") -> float:
    """User and system CPU seconds so far of a process (all threads) or one of its tasks."""
    stat = Path(f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_cpu_s() -> float:
    """CPU seconds of this process's other threads: sandbox's fd store listeners."""
    return cpu_s(os.getpid()) - cpu_s(os.getpid(), str(os.getpid()))


def runs(start: int, end: int) -> list[range]:
    """Runs of at most BATCH fd numbers, none across a session's boundary."""
    found = []
    while start < end:
        stop = min(start + BATCH, end, (start // FDS_PER_SESSION + 1) * FDS_PER_SESSION)
        found.append(range(start, stop))
        start = stop
    return found


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def handover_written(log: Path) -> dict[str, Any]:
    """The daemon's last simulated_handover_written log line: bytes, copy_s, record_s."""
    lines = [ln for ln in log.read_text().splitlines() if '"simulated_handover_written"' in ln]
    fields: dict[str, Any] = json.loads(lines[-1][lines[-1].index("{"):])
    return fields


class Bench:
    def __init__(self, sizes: Sizes, stack: ExitStack, bus: PrivateBus, root: Path) -> None:
        self.sizes = sizes
        self.stack = stack
        self.bus = bus
        self.root = root
        self.log_path = root / "daemons.log"
        self.log = stack.enter_context(self.log_path.open("ab"))
        self.results = Results()
        self.rng = random.Random(1)
        self.clients: set[Client] = set()
        self.bare_pid = self.bare_raw_pid = 0
        stack.callback(lambda: self.drop(*self.clients))

    # ---- plumbing --------------------------------------------------------------------

    def notifications(self) -> Notifications:
        """An fd store of its own: one per boot (a reboot empties systemd's store)."""
        notes = Notifications()
        self.stack.callback(lambda: notes.close() if notes.sock.fileno() >= 0 else None)
        return notes

    def start(self, state: Path, notes: Notifications,
              name: str = "start_empty_s") -> DaemonProcess:
        daemon = DaemonProcess(self.bus.address, state, "--backend", "simulated",
                               log=self.log, notifications=notes)
        self.stack.callback(daemon.kill)
        started = time.perf_counter()
        daemon.start()
        # From the exec, as under systemd: not the launcher that puts the fds in place.
        self.results.add(name, daemon.ready_at - daemon.exec_at, "s")
        self.results.add(f"{name}_with_launcher", since(started), "s")
        return daemon

    async def client(self) -> Client:
        client = await Client.connect(self.bus.address)
        self.clients.add(client)
        return client

    def drop(self, *clients: Client) -> None:
        for client in clients:
            self.clients.discard(client)
            client.close()

    @contextmanager
    def memfds(self, layouts: list[Layout]) -> Iterator[list[int]]:
        """Guest memory for one scenario, freed when it ends."""
        fds: list[int] = []
        try:
            fds.extend(layout.memfd(f"guest{i}") for i, layout in enumerate(layouts))
            yield fds
        finally:
            close_all(fds)

    def layouts(self, count: int, shape: tuple[int, int, int]) -> list[Layout]:
        return [Layout.scattered(*shape, self.rng) for _ in range(count)]

    def scratch(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    async def freeze_and_reboot(self, client: Client, daemon: DaemonProcess, tag: str) -> None:
        """Freeze and Reboot (timed on the client: call to reply), then the old daemon's exit."""
        started = time.perf_counter()
        await client.freeze()
        self.results.add(f"{tag}_freeze_s", since(started), "s")
        os.sync()  # earlier writes are not this handover's to pay for
        started = time.perf_counter()
        await client.reboot()
        self.results.add(f"{tag}_reboot_s", since(started), "s")
        started = time.perf_counter()
        if daemon.wait() != 0:
            raise RuntimeError("liveupdated did not exit 0 after Reboot")
        self.results.add(f"{tag}_exit_s", since(started), "s")

    # ---- PreserveFd, RSS and restore with 10,000 fds ---------------------------------

    async def preserve(self) -> None:
        self.bare_pid = start_bare_service(self.bus.address, self.stack)
        self.bare_raw_pid = start_bare_service(self.bus.address, self.stack, "raw")
        calls = self.sizes.preserve_calls
        # One memfd per token, as VMMs hand them over (systemd's fd store keeps one fd per
        # open file description: a memfd preserved twice costs the daemon a reopen). Each
        # is closed here once preserved: the fd store kept in this process holds them too.
        for repeat in range(self.sizes.repeats):
            with self.memfds([Layout(MIB, 4096, (0,))] * HELD) as fds:
                progress(f"PreserveFd x {calls}, {HELD} fds held, repeat {repeat + 1}")
                await self.bare_calls("bare", calls, fds[0])
                await self.bare_calls("bare_raw", calls, fds[0])
                batch_rate = await self.bare_calls("bare_batch", len(runs(calls, HELD)), fds[0])
                self.results.add("bare_batch_fds_per_s", batch_rate * BATCH, "fds/s")
                restarts = 0 if repeat else self.sizes.restarts  # of the first daemon only
                await self.restore(*await self.fill(fds, repeat), restarts=restarts)

    async def calls(self, name: str, pid: int, count: int,
                    call: Callable[[int], Awaitable[object]]) -> float:
        """Calls/s of `count` calls, and the CPU time per call of the service (`pid`), of
        dbus-daemon, of the client (this process's main thread) and of the fd store."""
        assert self.bus.process is not None
        me, bus = os.getpid(), self.bus.process.pid
        clocks: dict[str, Callable[[], float]] = {
            "": lambda: cpu_s(pid), "_bus": lambda: cpu_s(bus),
            "_client": lambda: cpu_s(me, str(me)), "_fdstore": bench_cpu_s}
        before = {part: clock() for part, clock in clocks.items()}
        seconds = await drive(count, call)
        for part, clock in clocks.items():
            spent = max(0.0, clock() - before[part])  # clock ticks are 10 ms: never < 0
            self.results.add(f"{name}{part}_cpu_us_per_call", round(spent / count * 1e6, 1),
                             "us")
        return self.results.add(f"{name}_calls_per_s", count / seconds, "calls/s")

    async def bare_calls(self, name: str, calls: int, fd: int) -> float:
        """Calls/s of the bare service, measured as `name`: `bare` and `bare_raw` Echo one
        fd a call (through dbus-fast's dispatch or a raw handler), `bare_batch` EchoAll
        BATCH fds a call, beside PreserveFds."""
        bus = await MessageBus(bus_address=self.bus.address, negotiate_unix_fd=True).connect()
        destination, pid = ((BARE_RAW_NAME, self.bare_raw_pid) if name == "bare_raw"
                            else (BARE_NAME, self.bare_pid))
        count = BATCH if name == "bare_batch" else 1
        member, signature, body = (("EchoAll", "ah", [list(range(count))]) if count > 1
                                   else ("Echo", "h", [0]))

        async def call(_: int) -> None:
            reply = await bus.call(Message(destination=destination, path=BARE_PATH,
                                           interface=BARE_NAME, member=member,
                                           signature=signature, body=body,
                                           unix_fds=[fd] * count))
            assert reply is not None and len(reply.unix_fds) == count, reply
            close_all(reply.unix_fds)

        try:
            return await self.calls(name, pid, calls, call)
        finally:
            bus.disconnect()

    async def fill(
        self, fds: list[int], repeat: int
    ) -> tuple[DaemonProcess, Client, Notifications, Path]:
        """PreserveFd for the first preserve_calls fds, one a call; PreserveFds for the
        rest of HELD, BATCH a call. Both timed, each against the bare method's rate."""
        state, notes = self.scratch(f"preserve{repeat}"), self.notifications()
        daemon = self.start(state, notes)
        client = await self.client()
        sessions = [await client.create_session(f"vm{i}")
                    for i in range(-(-HELD // FDS_PER_SESSION))]
        single = self.sizes.preserve_calls
        bare = self.results.samples["bare_calls_per_s"][-1]

        async def call(i: int) -> None:
            fd, fds[i] = fds[i], -1
            try:
                await sessions[i // FDS_PER_SESSION].preserve_fd(f"ram{i}", fd)
            finally:
                os.close(fd)

        rate = await self.calls("preserve", daemon.pid, single, call)
        self.results.add("preserve_ratio", rate / bare, "")

        batches = runs(single, HELD)

        async def batch_call(b: int) -> None:
            held = [fds[i] for i in batches[b]]
            try:
                await sessions[batches[b][0] // FDS_PER_SESSION].preserve_fds(
                    [(f"ram{i}", fd, ()) for i, fd in zip(batches[b], held, strict=True)])
            finally:
                close_all(held)
                for i in batches[b]:
                    fds[i] = -1

        calls = len(batches)
        calls_per_s = await self.calls("preserve_batch", daemon.pid, calls, batch_call)
        fds_per_s = calls_per_s * (HELD - single) / calls
        self.results.add("preserve_batch_fds_per_s", fds_per_s, "fds/s")
        self.results.add("preserve_batch_ratio", fds_per_s / bare, "")
        self.results.add("preserve_batch_vs_bare_batch",
                         fds_per_s / self.results.samples["bare_batch_fds_per_s"][-1], "")
        self.results.add("rss_mib_10k_preserved", rss_mib(daemon.pid), "MiB")
        return daemon, client, notes, state

    async def restore(self, daemon: DaemonProcess, client: Client, notes: Notifications,
                      state: Path, restarts: int) -> None:
        """Restart the daemon with its fds in the store (the owner stays on the bus), each
        time beside the baseline: a bare import of the daemon's modules in a new process."""
        for restart in range(restarts):
            progress(f"restart with {HELD} fds, {restart + 1}/{restarts}")
            for name, code in (("import_s", "import liveupdated.daemon"), ("python_s", "pass")):
                self.results.add(name, timed([sys.executable, "-c", code]), "s")
            daemon.stop()
            daemon = self.start(state, notes, "restore_s")
            self.results.add("rss_mib_10k_restarted", rss_mib(daemon.pid), "MiB")
        if restarts:
            fds = sum(s.fd_count for s in await client.list_sessions())
            if fds != HELD or len(os.listdir(f"/proc/{daemon.pid}/fd")) < HELD:
                raise RuntimeError(f"the restarted daemon holds {fds} fds, not {HELD}")
        daemon.stop()
        self.drop(client)
        notes.close()
        shutil.rmtree(state)

    # ---- handover throughput against cp ----------------------------------------------

    async def handover(self) -> None:
        layouts = self.layouts(self.sizes.handover_sessions * 4, self.sizes.handover)
        with self.memfds(layouts) as fds:
            await self.handover_vs_cp(layouts, fds)

    async def handover_vs_cp(self, layouts: list[Layout], fds: list[int]) -> None:
        shm = Path(tempfile.mkdtemp(prefix="lud-bench-", dir="/dev/shm"))
        self.stack.callback(shutil.rmtree, shm)
        sources = [str(shm / f"vm{i // 4}.ram{i % 4}") for i in range(len(layouts))]
        for layout, path in zip(layouts, sources, strict=True):
            layout.file(path)
        data = sum(layout.data_bytes for layout in layouts)
        for repeat in range(self.sizes.repeats):
            progress(f"handover of {data / MIB:.0f} MiB in {len(layouts)} memfds, "
                     f"repeat {repeat + 1}")
            await self.handover_once(fds, data, repeat)
            target = self.scratch(f"cp{repeat}")
            target.mkdir()
            os.sync()
            cp_s = self.results.add(
                "cp_s", timed(["cp", "--sparse=always", *sources, str(target)]), "s")
            sync_s = self.results.add(
                "cp_sync_s", timed(["sync", "--file-system", str(target)]), "s")
            shutil.rmtree(target)
            copy_s = self.results.samples["handover_copy_s"][-1]
            reboot_s = self.results.samples["handover_reboot_s"][-1]
            self.results.add("handover_bytes_per_s", data / copy_s, "B/s")
            self.results.add("cp_bytes_per_s", data / cp_s, "B/s")
            self.results.add("cp_sync_bytes_per_s", data / (cp_s + sync_s), "B/s")
            self.results.add("handover_ratio", cp_s / copy_s, "")
            # The whole Reboot() ends with the kexec record's fsync, which waits behind
            # the device's writeback of the copies: against cp alone and cp + sync.
            self.results.add("handover_reboot_ratio", cp_s / reboot_s, "")
            self.results.add("handover_reboot_ratio_vs_cp_sync", (cp_s + sync_s) / reboot_s, "")

    async def handover_once(self, fds: list[int], data: int, repeat: int) -> None:
        state, notes = self.scratch(f"handover{repeat}"), self.notifications()
        daemon = self.start(state, notes)
        client = await self.client()
        sessions = [await client.create_session(f"vm{i}") for i in range(len(fds) // 4)]
        await drive(len(fds), lambda i: sessions[i // 4].preserve_fd(f"ram{i % 4}", fds[i]))
        await client.prepare()
        await self.freeze_and_reboot(client, daemon, "handover")
        written = handover_written(self.log_path)
        if written["bytes"] != data:
            raise RuntimeError(f"the handover carried {written['bytes']} bytes, not {data}")
        self.results.add("handover_copy_s", written["copy_s"], "s")
        self.results.add("handover_record_s", written["record_s"], "s")
        self.drop(client)
        notes.close()
        shutil.rmtree(state)

    # ---- one 64 GiB sparse memfd, and a host of 64 VMs across the update -------------

    async def sparse(self) -> None:
        (layout,) = self.layouts(1, SPARSE)
        for repeat in range(self.sizes.repeats):
            progress(f"64 GiB sparse memfd, repeat {repeat + 1}")
            with self.memfds([layout]) as fds:  # a small one: create it anew each time
                await self.update("sparse", [fds], [[layout]], repeat)
            total = sum(self.results.samples[f"sparse_{part}_s"][-1]
                        for part in ("freeze", "reboot", "start", "all_fds"))
            self.results.add("sparse_64g_s", total, "s")

    async def blackout(self) -> None:
        layouts = self.layouts(64 * 4, self.sizes.blackout)
        per_vm = [layouts[i:i + 4] for i in range(0, len(layouts), 4)]
        data = sum(layout.data_bytes for layout in layouts) / MIB
        shm = Path(tempfile.mkdtemp(prefix="lud-bench-", dir="/dev/shm"))
        self.stack.callback(shutil.rmtree, shm)
        sources = [str(shm / f"vm{i // 4}.ram{i % 4}") for i in range(len(layouts))]
        for layout, path in zip(layouts, sources, strict=True):
            layout.file(path)
        with self.memfds(layouts) as fds:
            for repeat in range(self.sizes.repeats):
                progress(f"blackout of 64 VMs x 4 memfds, {data:.0f} MiB, repeat {repeat + 1}")
                await self.update("host", [fds[i:i + 4] for i in range(0, len(fds), 4)],
                                  per_vm, repeat)
                total = sum(self.results.samples[f"host_{part}_s"][-1]
                            for part in ("freeze", "reboot", "exit", "start", "all_fds"))
                self.results.add("host_blackout_s", total, "s")
                self.results.add("host_last_fd_s", self.results.samples["host_all_fds_s"][-1]
                                 - self.results.samples["host_first_fd_s"][-1], "s")
                # The floor: the same bytes out to the state dir's disk and back to tmpfs
                # by cp, and an empty daemon's start (update() began with one just now).
                out, back = self.scratch(f"cp_out{repeat}"), shm / "back"
                out.mkdir()
                back.mkdir()
                os.sync()
                cp_out = self.results.add(
                    "cp_out_s", timed(["cp", "--sparse=always", *sources, str(out)]), "s")
                cp_back = self.results.add("cp_back_s", timed(
                    ["cp", "--sparse=always", *(str(out / Path(p).name) for p in sources),
                     str(back)]), "s")
                shutil.rmtree(out)
                shutil.rmtree(back)
                floor = cp_out + cp_back + self.results.samples["start_empty_s"][-1]
                self.results.add("blackout_floor_s", floor, "s")
                self.results.add("blackout_ratio", total / floor, "")

    async def update(self, tag: str, vms: list[list[int]], layouts: list[list[Layout]],
                     repeat: int) -> None:
        """A whole update, one client per VM, that checks every restored memfd."""
        state, notes = self.scratch(f"{tag}{repeat}"), self.notifications()
        daemon = self.start(state, notes)
        admin = await self.client()
        clients = [await self.client() for _ in vms]
        for i, (client, fds) in enumerate(zip(clients, vms, strict=True)):
            session = await client.create_session(f"vm{i}")
            for j, fd in enumerate(fds):
                await session.preserve_fd(f"ram{j}", fd)
        started = time.perf_counter()
        await admin.prepare()
        self.results.add(f"{tag}_prepare_s", since(started), "s")
        await self.freeze_and_reboot(admin, daemon, tag)
        self.drop(admin, *clients)
        notes.close()  # the old kernel's fds are gone with it

        notes = self.notifications()
        admin = await self.client()
        clients = [await self.client() for _ in vms]  # new VMMs, waiting for the bus name
        daemon = self.start(state, notes, f"{tag}_start_s")
        ready = time.perf_counter()
        slots = asyncio.Semaphore(CONCURRENCY)
        arrivals: list[float] = []

        async def vm(i: int) -> list[int]:
            async with slots:
                session = await clients[i].retrieve_session(f"vm{i}")
            fds = []
            for j in range(len(vms[i])):
                async with slots:
                    fds.append(await session.retrieve_fd(f"ram{j}"))
                arrivals.append(since(ready))
            return fds

        restored = await asyncio.gather(*(vm(i) for i in range(len(vms))))
        self.results.add(f"{tag}_first_fd_s", min(arrivals), "s")
        self.results.add(f"{tag}_all_fds_s", max(arrivals), "s")
        self.results.add(f"{tag}_daemon_blackout_s",
                         await admin.property("LastBlackoutUSec") / 1e6, "s")
        for fds, expected in zip(restored, layouts, strict=True):
            if not all(layout.matches(fd) for fd, layout in zip(fds, expected, strict=True)):
                raise RuntimeError(f"{tag}: a restored memfd differs from the original")
        await admin.finish()
        daemon.stop()
        self.drop(admin, *clients)
        notes.close()
        shutil.rmtree(state)
        for fd in [fd for fds in restored for fd in fds]:
            os.close(fd)


    # ---- fds handed back after READY=1 against fds handed over -------------------

    async def retrieve(self) -> None:
        for count in self.sizes.retrieve:
            tag = "retrieve" if count == 2_000 else (
                f"retrieve_{count // 1000}k" if count % 1000 == 0 else f"retrieve_{count}")
            for repeat in range(self.sizes.repeats):
                for batch in (False, True):
                    way = "RetrieveFds, 16 a call" if batch else "RetrieveFd, one a call"
                    progress(f"{count} fds over by PreserveFd, back by {way}, "
                             f"repeat {repeat + 1}")
                    await self.retrieve_once(count, f"{tag}_batch" if batch else tag,
                                             repeat, batch)

    async def retrieve_once(self, count: int, tag: str, repeat: int, batch: bool) -> None:
        """count // FDS_PER_VM VMs, one client each, all at once: each hands its memfds
        over one PreserveFd a call, and after the update asks for them back one
        RetrieveFd a call (or RetrieveFds, BATCH a call), checking each fd's every byte
        as it arrives. Rates in fds/s; `tag`_ratio is back ÷ over in this round."""
        vms = count // FDS_PER_VM
        smalls = [Small(i, self.rng.randrange(4 << 10, (16 << 10) + 1)) for i in range(count)]
        state, notes = self.scratch(f"retrieve{repeat}"), self.notifications()
        daemon = self.start(state, notes)
        admin = await self.client()
        clients = [await self.client() for _ in range(vms)]
        sessions = [await c.create_session(f"vm{i}") for i, c in enumerate(clients)]

        async def hand_over(i: int) -> None:
            for j in range(FDS_PER_VM):
                small = smalls[i * FDS_PER_VM + j]
                fd = small.memfd(f"ram{j}")  # made here, closed once handed over: the
                try:  # fd store in this process holds one too, and fds are bounded
                    await sessions[i].preserve_fd(f"ram{j}", fd)
                finally:
                    os.close(fd)

        cpu, started = cpu_s(daemon.pid), time.perf_counter()
        await asyncio.gather(*(hand_over(i) for i in range(vms)))
        over = self.results.add(f"{tag}_preserve_fds_per_s", count / since(started), "fds/s")
        self.results.add(f"{tag}_preserve_cpu_us_per_fd",
                         round((cpu_s(daemon.pid) - cpu) / count * 1e6, 1), "us")
        await admin.prepare()
        await self.freeze_and_reboot(admin, daemon, tag)
        self.drop(admin, *clients)
        notes.close()

        notes = self.notifications()
        admin = await self.client()
        clients = [await self.client() for _ in range(vms)]
        daemon = self.start(state, notes, f"{tag}_start_s")
        await self.hand_back(smalls, clients, tag, daemon, over, batch)
        await admin.finish()
        daemon.stop()
        self.drop(admin, *clients)
        notes.close()
        shutil.rmtree(state)

    async def hand_back(self, smalls: list[Small], clients: list[Client], tag: str,
                        daemon: DaemonProcess, over: float, batch: bool) -> None:
        """Every VM asks for its fds back at once, from READY=1: timed, each fd checked
        byte for byte as it arrives (an fd still being filled would fail)."""
        firsts: list[float] = []
        lasts: list[float] = []
        wrong: list[str] = []

        def check(i: int, token: str, fd: int) -> None:
            try:
                if not smalls[i * FDS_PER_VM + int(token[3:])].matches(fd):
                    wrong.append(f"vm{i}/{token}")
            finally:
                os.close(fd)

        async def vm(i: int) -> None:
            session = await clients[i].retrieve_session(f"vm{i}")
            tokens = [f"ram{j}" for j in range(FDS_PER_VM)]
            if batch:
                for k in range(0, FDS_PER_VM, BATCH):
                    for token, fd in await session.retrieve_fds(tokens[k:k + BATCH]):
                        check(i, token, fd)
                    if not k:
                        firsts.append(time.monotonic())
            else:
                for token in tokens:
                    check(i, token, await session.retrieve_fd(token))
                    if token == tokens[0]:
                        firsts.append(time.monotonic())
            lasts.append(time.monotonic())

        pid = daemon.pid
        count, cpu, main = len(smalls), cpu_s(pid), cpu_s(pid, str(pid))
        await asyncio.gather(*(vm(i) for i in range(len(clients))))
        # The daemon's CPU from READY=1 on: all threads (restores ahead included), and
        # its event loop's thread alone.
        self.results.add(f"{tag}_cpu_us_per_fd", round((cpu_s(pid) - cpu) / count * 1e6, 1),
                         "us")
        self.results.add(f"{tag}_loop_cpu_us_per_fd",
                         round((cpu_s(pid, str(pid)) - main) / count * 1e6, 1), "us")
        if wrong:
            raise RuntimeError(f"{tag}: {len(wrong)} restored memfds differ, e.g. {wrong[:3]}")
        back_s = self.results.add(f"{tag}_all_fds_s", max(lasts) - daemon.ready_at, "s")
        self.results.add(f"{tag}_first_fd_s", min(firsts) - daemon.ready_at, "s")
        from_exec_s = self.results.add(f"{tag}_all_fds_from_exec_s",
                                       max(lasts) - daemon.exec_at, "s")
        back = self.results.add(f"{tag}_fds_per_s", count / back_s, "fds/s")
        self.results.add(f"{tag}_ratio", back / over, "")
        self.results.add(f"{tag}_from_exec_ratio", count / from_exec_s / over, "")


def machine(root: Path) -> dict[str, Any]:
    def fs_type(path: Path) -> str:
        mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
        resolved = str(path.resolve()).rstrip("/") + "/"
        best = max((m for m in mounts if resolved.startswith(m[0].rstrip("/") + "/")),
                   key=lambda m: len(m[0]))
        return best[1]

    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release,
            "fs_state_dir": fs_type(root), "fs_dev_shm": fs_type(Path("/dev/shm")),
            "loadavg_1min": os.getloadavg()[0]}


PHASES = [("freeze", "Freeze"), ("reboot", "handover"), ("exit", "exit"), ("start", "start"),
          ("first_fd", "first fd"), ("last_fd", "last fd")]
RAW = ["preserve_calls_per_s", "preserve_batch_fds_per_s", "bare_calls_per_s",
       "handover_bytes_per_s", "cp_bytes_per_s", "cp_sync_bytes_per_s", "restore_s",
       "import_s", "sparse_freeze_s", "sparse_reboot_s", "sparse_start_s", "sparse_all_fds_s",
       "host_prepare_s", "host_blackout_s", "retrieve_preserve_fds_per_s", "retrieve_fds_per_s",
       "retrieve_batch_fds_per_s", "retrieve_10k_preserve_fds_per_s", "retrieve_10k_fds_per_s",
       "retrieve_10k_batch_fds_per_s", "cp_out_s", "cp_back_s", "blackout_floor_s"]


def other_retrieve_targets(stats: dict[str, Any]) -> list[Target]:
    """Retrieve rounds of other sizes (--retrieve-fds) are held to the same target."""
    known = {key for key, *_ in TARGETS}
    targets: list[Target] = []
    for key in stats:
        size = re.fullmatch(r"retrieve_(\d+)(k?)_ratio", key)
        if size and key not in known:
            count = int(size[1]) * (1000 if size[2] else 1)
            targets.append((key, f"RetrieveFd / PreserveFd fds/s, {count:,}",
                            lambda v: v >= 0.7, ">= 0.7"))
    return targets


def report(results: Results, quick: bool, info: dict[str, Any], load: float) -> dict[str, Any]:
    """Print the table; return the JSON object."""
    stats = results.summary()
    print(f"liveupdated bench ({'quick' if quick else 'full'}): {info['nproc']} x {info['cpu']}, "
          f"kernel {info['kernel']}, state dir on {info['fs_state_dir']}, "
          f"load average {info['loadavg_1min']:.1f} (at start {load:.1f})\n")
    print(f"{'measure':<34} {'median':>10} {'min':>10} {'max':>10} {'n':>3}  unit")
    for name, s in stats.items():
        print(f"{name:<34} {s['median']:10.4g} {s['min']:10.4g} {s['max']:10.4g} "
              f"{s['n']:3d}  {results.units[name]}".rstrip())
    targets = TARGETS + other_retrieve_targets(stats)
    headline = {key: stats[key]["median"] for key, *_ in targets if key in stats}
    met = {key: is_met(headline[key]) for key, _, is_met, _ in targets if key in headline}
    phases = {text: stats[f"host_{part}_s"]["median"] for part, text in PHASES
              if f"host_{part}_s" in stats}
    if phases:
        print("\nblackout of the realistic host, by phase (medians): " + " | ".join(
            f"{text} {value:.3g} s" for text, value in phases.items())
            + f" = {sum(phases.values()):.3g} s; largest: {max(phases, key=phases.__getitem__)}")
    print(f"\n{'target (docs/DESIGN.md)':<38} {'median':>8}  {'target':<15} met")
    for key, text, _, target in targets:
        if key in headline:
            print(f"{text:<38} {headline[key]:8.3g}  {target:<15} "
                  f"{'yes' if met[key] else 'NO'}")
    return {**headline, "raw": {name: stats[name]["median"] for name in RAW if name in stats},
            "met": met, "blackout_phases_s": phases, "mode": "quick" if quick else "full",
            "machine": {**info, "loadavg_1min_start": load}, "stats": stats}


SCENARIOS = ("preserve", "sparse", "blackout", "handover", "retrieve")


async def run(quick: bool, only: list[str], retrieve: list[int]) -> dict[str, Any]:
    raise_fd_limit(4 * HELD)  # the guest memfds, and the fd store kept in this process
    # Bytecode compiled, as an installed package has it, for the daemon and the baseline.
    compileall.compile_dir(Path(liveupdated.__file__).parent, quiet=1)
    with ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="lud-bench-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        bus = stack.enter_context(PrivateBus(root / "bus"))
        sizes = QUICK if quick else FULL
        if retrieve:
            sizes = dataclasses.replace(sizes, retrieve=tuple(retrieve))
        bench = Bench(sizes, stack, bus, root)
        started, load = time.perf_counter(), os.getloadavg()[0]
        for scenario in SCENARIOS:
            if not only or scenario in only:
                await getattr(bench, scenario)()
        results = bench.results
        if "import_s" in results.samples:
            results.add("restore_ratio",
                        results.median("restore_s") / results.median("import_s"), "")
            results.add("rss_mib_10k", max(results.median("rss_mib_10k_preserved"),
                                           results.median("rss_mib_10k_restarted")), "MiB")
        progress(f"done in {since(started):.1f} s")
        return report(results, quick, machine(root), load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (< 50 s)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--only", action="append", choices=SCENARIOS, default=[],
                        help="run this scenario (repeatable); all of them by default")
    parser.add_argument("--retrieve-fds", action="append", type=int, default=[],
                        metavar="N", help="fds of a retrieve round, in VMs of "
                        f"{FDS_PER_VM} (repeatable); default 2,000 and, in a full run, 10,000")
    args = parser.parse_args()
    if any(n <= 0 or n % FDS_PER_VM for n in args.retrieve_fds):
        parser.error(f"--retrieve-fds takes a positive multiple of {FDS_PER_VM}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as for Ctrl-C
    result = asyncio.run(run(args.quick, args.only, args.retrieve_fds))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
