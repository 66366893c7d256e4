"""`make bench-nspawn`: the blackout on the path hosts take, the fdstore backend across
`systemctl soft-reboot`, in a booted Debian sid container (systemd 262).

liveupdated is the .deb of this tree installed with apt, as a user installs it (no
drop-in). The VMMs are units, bench-vmm@NAME.service (tests/nspawn/bench_vmm.py), one bus
connection each, enabled, so that after the soft-reboot they all come back at once as a
host's do. Per size, each repeat:

- bare: the same units holding nothing, a plain soft-reboot; timed from the call of
  `systemctl soft-reboot` to the last VMM unit ready (its ActiveEnterTimestamp);
- cycle: the VMMs hand their memfds over (all at once, from a barrier: PreserveFd fds/s),
  Prepare, Freeze, Reboot(): systemd soft-reboots carrying liveupdated's fd store; the
  VMMs come back, RetrieveSession, RetrieveFd of each fd (RetrieveFd fds/s); every fd is
  checked byte for byte after it is back, outside the timed span. The blackout is Freeze
  to the last RetrieveFd reply, with its phases: Freeze; Reboot() to the soft-reboot
  (systemd's SoftRebootStartTimestamp); soft-reboot to liveupdated READY; READY to the
  first and to the last fd back;
- after the 10,000-fd cycle: `python -c 'import liveupdated.daemon'` timed in the same
  container, against liveupdated.service's ExecMainStart -> READY of that cycle.

Every time is CLOCK_MONOTONIC, shared by the host, the container, systemd and the VMMs.
The last line of the output is one JSON object (`--json`: only that on stdout).

    tests/nspawn/bench_fdstore.py [--size 64x4] [--size 10k] [--repeats N] [--order O]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the tests' helpers are a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.nspawn"

from .container import Container, overlay_root
from .installed import (
    PYTHON,
    UNIT,
    Installed,
    build_deb,
    build_wheels,
    guest_python_version,
    wait_for,
)
from .rootfs import SID, cached_rootfs, tmpfs

HERE = Path(__file__).resolve().parent
GUEST_DIR = "/var/tmp/liveupdated-bench"
VMM_SCRIPT = "/opt/liveupdated-bench/bench_vmm.py"
TEMPLATE = "/etc/systemd/system/bench-vmm@.service"
MANAGER = ("org.liveupdate1", "/org/liveupdate1", "org.liveupdate1.Manager")
MIB = 1 << 20
# The console to the log, read: with --console=passive nobody reads it, and the status
# lines of 64 VMM units stopping at the soft-reboot filled it until PID 1 blocked in a
# write to it, for good.
CONSOLE = ("--console=read-only",)
# PID 1's fd limit as on a host (systemd raises its own there; in the container it keeps
# nspawn's, this machine's hard limit of 20,000, whatever --rlimit= says): it copies every
# fd of every store to serialize them for the soft-reboot, and with 10,000 in
# liveupdated's store it failed ("Failed to copy file descriptor for serialization: Too
# many open files") and exited.
PID1_NOFILE = 524288
USEC = 1e-6

# How the VMM units start against liveupdated. "after": After= and Wants= it, the way a
# unit that needs a service is usually written: the VMMs start once liveupdated is READY.
# "activation": no ordering: the VMMs start with it, and their first call waits for the
# bus name (D-Bus activation, dbus/org.liveupdate1.service), their own start overlapping
# the daemon's.
ORDERS = {
    "after": "After=liveupdated.service\nWants=liveupdated.service\n",
    "activation": "",
}


@dataclass(frozen=True)
class Size:
    label: str
    vmms: int
    fds: int  # per VMM
    size: int  # bytes of data per fd

    @property
    def total_fds(self) -> int:
        return self.vmms * self.fds


SIZES = {
    "64x4": Size("64x4", 64, 4, 8 * MIB),  # 2 GiB of data
    "10k": Size("10k", 100, 100, 64 << 10),  # 10,000 fds, 625 MiB
}


def parse_size(text: str) -> Size:
    """64x4, 10k, or VMMSxFDS[:BYTES] (e.g. 4x3:4096) for a small run."""
    if text in SIZES:
        return SIZES[text]
    shape, _, size = text.partition(":")
    vmms, _, fds = shape.partition("x")
    return Size(text, int(vmms), int(fds), int(size or 4096))


def template(order: str) -> str:
    return (
        "# A VMM of the bench (tests/nspawn/bench_fdstore.py)\n"
        f"[Unit]\nDescription=liveupdated bench VMM %i\n{ORDERS[order]}\n"
        "[Service]\nType=notify\nNotifyAccess=main\n"
        f"ExecStart={PYTHON} {VMM_SCRIPT} run %i\n"
        "TimeoutStartSec=600\nTimeoutStopSec=30\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


class Bench:
    """The bench's steps in one booted container with liveupdated installed."""

    def __init__(self, installed: Installed, order: str = "after", log: Any = None) -> None:
        self.installed = installed
        self.box: Container = installed.box
        self.order = order
        self.log = log or sys.stderr
        self.dir = self.box.host_path(GUEST_DIR)

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    def setup(self) -> None:
        self.box.copy_in(HERE / "bench_vmm.py", VMM_SCRIPT)
        unit = self.box.host_path(TEMPLATE)
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(template(self.order))
        for sub in ("armed", "reports"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "barrier").touch()
        (self.dir / "check-gate").touch()
        self.installed.systemctl("daemon-reload")
        self.installed.systemctl("start", UNIT)

    # -- helpers ------------------------------------------------------------------------

    def units(self, size: Size) -> list[str]:
        return [f"bench-vmm@vm{i}.service" for i in range(size.vmms)]

    def configure(self, size: Size, mode: str) -> None:
        for sub in ("armed", "reports"):
            for old in (self.dir / sub).iterdir():
                old.unlink()
        for name in ("update.json", "softreboot.json"):
            (self.dir / name).unlink(missing_ok=True)
        config = {"fds": size.fds, "size": size.size, "mode": mode}
        (self.dir / "config.json").write_text(json.dumps(config))

    def reports(self, phase: str, count: int, timeout: float = 300.0) -> list[dict[str, Any]]:
        """The VMMs' reports of `phase`, once all `count` are written."""
        folder = self.dir / "reports"

        def written() -> list[Path] | None:
            found = sorted(folder.glob(f"*.{phase}.json"))
            return found if len(found) == count else None

        paths = wait_for(written, f"{count} VMM reports of {phase}", timeout)
        return [json.loads(p.read_text()) for p in paths]

    def show(self, units: Sequence[str], *props: str) -> list[dict[str, str]]:
        out = self.box.run(["systemctl", "show", *(f"--property={p}" for p in props),
                            *units], timeout=60).stdout
        return [dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
                for block in out.strip().split("\n\n")]

    def monotonic(self, unit: str, prop: str) -> float:
        [found] = self.show([unit], prop)
        return int(found[prop]) * USEC

    def manager(self, prop: str) -> float:
        out = self.box.run(["busctl", "--system", "get-property", "org.freedesktop.systemd1",
                            "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                            prop]).stdout.split()
        return int(out[1]) * USEC  # "t 123"

    def units_ready(self, size: Size) -> list[float]:
        shown = self.show(self.units(size), "ActiveEnterTimestampMonotonic")
        return [int(s["ActiveEnterTimestampMonotonic"]) * USEC for s in shown]

    def stop_vmms(self, size: Size) -> None:
        self.installed.systemctl("stop", *self.units(size))
        self.installed.systemctl("disable", "--quiet", *self.units(size))

    # -- the runs -----------------------------------------------------------------------

    def bare(self, size: Size) -> dict[str, float]:
        """The same units, holding nothing, across a plain soft-reboot."""
        self.configure(size, "bare")
        units = self.units(size)
        self.installed.systemctl("enable", "--quiet", *units)
        self.installed.systemctl("start", *units)
        self.reports("bare", size.vmms)
        self.configure(size, "bare")
        self.box.soft_reboot(command=[PYTHON, VMM_SCRIPT, "softreboot"], timeout=600)
        self.reports("bare", size.vmms)
        start = json.loads((self.dir / "softreboot.json").read_text())["soft_reboot_call"]
        last = max(self.units_ready(size))
        figures = {
            "bare_s": last - start,
            "bare_shutdown_s": self.manager("UserspaceTimestampMonotonic") - start,
            "bare_ready_s": self.monotonic(UNIT, "ActiveEnterTimestampMonotonic") - start,
            "bare_daemon_start_s": self.monotonic(UNIT, "ActiveEnterTimestampMonotonic")
            - self.monotonic(UNIT, "ExecMainStartTimestampMonotonic"),
        }
        self.stop_vmms(size)
        return figures

    def cycle(self, size: Size) -> dict[str, Any]:
        """Hand over, Freeze, Reboot (soft-reboot), every fd back and checked."""
        self.configure(size, "hold")
        units = self.units(size)
        self.installed.systemctl("enable", "--quiet", *units)
        with open(self.dir / "barrier") as barrier:
            fcntl.flock(barrier, fcntl.LOCK_EX)  # the VMMs wait here, fds in hand
            self.installed.systemctl("start", "--no-block", *units)
            wait_for(lambda: True if len(list((self.dir / "armed").iterdir())) == size.vmms
                     else None, "every VMM at the barrier", timeout=600)
            fcntl.flock(barrier, fcntl.LOCK_UN)
        preserved = self.reports("preserve", size.vmms)
        self.installed.wait_fd_store(size.total_fds)
        with open(self.dir / "check-gate") as gate:
            fcntl.flock(gate, fcntl.LOCK_EX)  # no VMM checks bytes while others retrieve
            self.box.soft_reboot(command=[PYTHON, VMM_SCRIPT, "update"], timeout=600)
            retrieved = self.reports("retrieve", size.vmms, timeout=600)
            fcntl.flock(gate, fcntl.LOCK_UN)
        update = json.loads((self.dir / "update.json").read_text())
        figures = self._figures(size, update, preserved, retrieved)
        checks = self.reports("checked", size.vmms, timeout=600)
        problems = [p for r in checks for p in r["problems"]]
        checked = sum(r["checked"] for r in checks)
        if problems or checked != size.total_fds:
            raise AssertionError(f"{checked} of {size.total_fds} fds checked; {problems[:5]}")
        self.installed.call("Finish")
        self.stop_vmms(size)
        return figures

    def _figures(self, size: Size, update: dict[str, float],
                 preserved: list[dict[str, Any]], retrieved: list[dict[str, Any]]
                 ) -> dict[str, Any]:
        # The new userspace's start by systemd's clock: the end of the old one's shutdown.
        # (Its PreviousShutdown*Timestamps kept the first soft-reboot's values on systemd
        # 262 when read after the second.)
        soft_reboot = self.manager("UserspaceTimestampMonotonic")
        started = self.monotonic(UNIT, "ExecMainStartTimestampMonotonic")
        ready = self.monotonic(UNIT, "ActiveEnterTimestampMonotonic")
        replies = [end for r in retrieved for _, end in r["calls"]]
        first, last = min(replies), max(replies)
        freeze = update["freeze_call"]
        serving = busy([(r["asked"], max(e for _, e in r["calls"])) for r in retrieved])
        retrieve_busy = busy([(min(s for s, _ in r["calls"]), max(e for _, e in r["calls"]))
                              for r in retrieved])
        preserve_busy = busy([(min(s for s, _ in r["calls"]), max(e for _, e in r["calls"]))
                              for r in preserved])
        reboot_reply = update.get("reboot_reply")
        phases = {
            "Freeze": update["freeze_reply"] - freeze,
            # From the Freeze reply (the Reboot() call follows at once), so that the
            # phases add up to the blackout.
            "Reboot() to shutdown": soft_reboot - update["freeze_reply"],
            "soft-reboot to READY": ready - soft_reboot,
            "READY to first fd": first - ready,
            "first fd to last fd": last - first,
        }
        daemon_start = ready - started
        share = (phases["Freeze"] + (reboot_reply - update["reboot_call"] if reboot_reply
                                     else 0.0) + daemon_start + serving)
        return {
            "blackout_s": last - freeze,
            "phases_s": phases,
            "freeze_to_ready_s": ready - freeze,
            "ready_to_last_fd_s": last - ready,
            "reboot_reply_s": (reboot_reply - update["reboot_call"]) if reboot_reply else None,
            "daemon_start_s": daemon_start,
            "exec_after_soft_reboot_s": started - soft_reboot,
            "vmm_first_start_after_ready_s": min(r["started"] for r in retrieved) - ready,
            "vmm_last_asked_after_ready_s": max(r["asked"] for r in retrieved) - ready,
            "serving_s": serving,
            "liveupdated_share_s": share,
            "preserve_fds_per_s": size.total_fds / preserve_busy,
            "retrieve_fds_per_s": size.total_fds / retrieve_busy,
            "retrieve_ratio": preserve_busy / retrieve_busy,
            "fds": size.total_fds,
            "bytes": size.total_fds * size.size,
        }

    def import_time(self, repeats: int = 5) -> float:
        """Median wall time of `python -c 'import liveupdated.daemon'` in the container,
        timed by a parent process there (exec to exit)."""
        script = (
            "import subprocess, sys, time\n"
            "t = time.monotonic()\n"
            f"subprocess.run([{PYTHON!r}, '-c', 'import liveupdated.daemon'], check=True)\n"
            "print(time.monotonic() - t)\n"
        )
        times = [float(self.box.run([PYTHON, "-c", script]).stdout) for _ in range(repeats)]
        return statistics.median(times)


def busy(spans: Sequence[tuple[float, float]]) -> float:
    """The time during which at least one of the spans was open (their union's length)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(bench: Bench, sizes: Sequence[Size], repeats: int) -> dict[str, Any]:
    """Every size, `repeats` times a bare soft-reboot and a cycle, interleaved."""
    bench.setup()
    results: dict[str, Any] = {"order": bench.order, "load": [load()], "sizes": {}}
    for size in sizes:
        rounds: list[dict[str, Any]] = []
        imports: list[float] = []
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if 2 * size.total_fds + 1000 > limit:
            why = (f"{size.total_fds} fds cannot cross a soft-reboot under PID 1's fd limit "
                   f"of {limit} (it holds each twice to serialize them)")
            bench.say(f"{size.label}: skipped: {why}")
            results.setdefault("skipped", {})[size.label] = why
            continue
        for repeat in range(repeats):
            bench.say(f"{size.label} round {repeat + 1}/{repeats}: bare soft-reboot "
                      f"(load {load()})")
            bare = bench.bare(size)
            bench.say(f"  bare {bare['bare_s']:.3f} s; cycle (load {load()})")
            cycle = bench.cycle(size)
            cycle.update(bare)
            cycle["over_bare_s"] = cycle["blackout_s"] - bare["bare_s"]
            if size.label != "64x4":  # the daemon start with the larger store
                imports.append(bench.import_time())
                cycle["import_s"] = imports[-1]
                cycle["start_ratio"] = cycle["daemon_start_s"] / imports[-1]
            bench.say("  " + line(cycle))
            rounds.append(cycle)
        results["sizes"][size.label] = summary(rounds)
    results["load"].append(load())
    return results


def line(c: dict[str, Any]) -> str:
    phases = " | ".join(f"{k} {v:.3f}" for k, v in c["phases_s"].items())
    return (f"blackout {c['blackout_s']:.3f} s ({c['over_bare_s']:+.3f} over bare "
            f"{c['bare_s']:.3f}): {phases}; daemon start {c['daemon_start_s']:.3f} s; "
            f"share {c['liveupdated_share_s']:.3f} s; PreserveFd "
            f"{c['preserve_fds_per_s']:.0f} fds/s, RetrieveFd {c['retrieve_fds_per_s']:.0f} "
            f"fds/s (ratio {c['retrieve_ratio']:.2f})")


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (min, max) of every figure over the rounds, phases too; the rounds kept."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values),
                "n": len(values)}

    numeric = [k for k, v in rounds[0].items() if isinstance(v, int | float)]
    out: dict[str, Any] = {k: stats([r[k] for r in rounds]) for k in numeric
                           if all(r.get(k) is not None for r in rounds)}
    out["phases_s"] = {k: statistics.median(r["phases_s"][k] for r in rounds)
                       for k in rounds[0]["phases_s"]}
    out["rounds"] = rounds
    return out


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The keys docs/DESIGN.md §5 holds the bench to, beside everything measured."""
    sizes = results["sizes"]
    out: dict[str, Any] = {}
    for label, key in (("64x4", "64x4"), ("10k", "10k")):
        if label in sizes:
            out[f"blackout_over_bare_{key}_s"] = sizes[label]["over_bare_s"]["median"]
    if not sizes:  # every size skipped
        sizes = {"none": {"over_bare_s": {"median": None}, "retrieve_ratio": {"median": None}}}
    big = sizes.get("10k") or sizes[list(sizes)[-1]]
    small = sizes.get("64x4") or sizes[next(iter(sizes))]
    # RetrieveFd against PreserveFd: the 10,000-fd VMMs (100 of them, 100 fds each), else
    # the largest size run.
    out["fdstore_retrieve_ratio"] = big["retrieve_ratio"]["median"]
    out["start_10k_ratio"] = big["start_ratio"]["median"] if "start_ratio" in big else None
    for label, figures in sizes.items():
        # A small run's sizes stand in for the two named ones: keys by label as well.
        out.setdefault(f"blackout_over_bare_{label}_s", figures["over_bare_s"]["median"])
    # A size not run is stood in for by the nearest one run (so that a small run has
    # every key), and named under `stand_in`: its target is then not judged (met: None).
    stand_in: dict[str, str] = {}
    if "blackout_over_bare_64x4_s" not in out:
        out["blackout_over_bare_64x4_s"] = small["over_bare_s"]["median"]
        stand_in["blackout_over_bare_64x4_s"] = next(iter(sizes))
    if "blackout_over_bare_10k_s" not in out:
        skipped = "10k" in results.get("skipped", {})
        out["blackout_over_bare_10k_s"] = None if skipped else big["over_bare_s"]["median"]
        stand_in["blackout_over_bare_10k_s"] = list(sizes)[-1]
    if "10k" not in sizes:
        stand_in["fdstore_retrieve_ratio"] = stand_in["start_10k_ratio"] = list(sizes)[-1]
    bounds = {"blackout_over_bare_64x4_s": (None, 0.3), "blackout_over_bare_10k_s": (None, 1.0),
              "fdstore_retrieve_ratio": (1.0, None), "start_10k_ratio": (None, 1.5)}
    out["met"] = {
        key: None if key in stand_in else out[key] is not None
        and (low is None or out[key] >= low) and (high is None or out[key] <= high)
        for key, (low, high) in bounds.items()
    }
    out["stand_in"] = stand_in
    return {**out, **results}


@contextlib.contextmanager
def environment(work: Path, log: Any = sys.stderr) -> Iterator[Installed]:
    """A sid root (cached), this tree's .deb built for it, a container booted on an
    overlay of the root, the .deb installed with apt; all gone at the end."""
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(tmpfs(work / "root"))
        cached_rootfs(root, suite=SID)
        print("building the wheels and the .deb for sid", file=log, flush=True)
        wheels = build_wheels(work / "wheels", guest_python_version(root))
        deb = build_deb(work / "packages", wheels, root)
        merged = stack.enter_context(overlay_root(root, work / "container"))
        with contextlib.suppress(ValueError):  # without CAP_SYS_RESOURCE: as it is
            resource.setrlimit(resource.RLIMIT_NOFILE, (PID1_NOFILE, PID1_NOFILE))
        box = Container(merged, log_path=work / "console.log", nspawn_args=CONSOLE)
        stack.callback(box.close)
        box.start(120)
        handover = work / "handover"  # the fdstore backend writes nothing there
        handover.mkdir(mode=0o700)
        yield Installed.install(box, deb, handover)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", action="append", type=parse_size,
                        help="64x4, 10k or VMMSxFDS:BYTES (repeatable; default: 64x4, 10k)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--order", choices=sorted(ORDERS), default="after")
    parser.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    parser.add_argument("--keep", type=Path, help="work directory to use (and keep)")
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C: the container is stopped and its mounts go.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    sizes = args.size or [SIZES["64x4"], SIZES["10k"]]
    if os.geteuid() != 0:
        print("bench-nspawn needs root (systemd-nspawn)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="bench-nspawn-", dir="/var/tmp")))
        installed = stack.enter_context(environment(work))
        bench = Bench(installed, args.order)
        results = headline(run(bench, sizes, args.repeats))
        results["machine"] = {"nproc": os.cpu_count(), "systemd": installed.box.run(
            ["systemctl", "--version"]).stdout.split()[1]}
    if not args.json:
        print(table(results))
    print(json.dumps(results))
    return 0


def table(results: dict[str, Any]) -> str:
    rows = [f"load {results['load'][0]} -> {results['load'][-1]}; VMM units: {results['order']}"]
    for label, s in results["sizes"].items():
        rows.append(f"{label}: blackout {s['blackout_s']['median']:.3f} s, bare "
                    f"{s['bare_s']['median']:.3f} s, over bare {s['over_bare_s']['median']:+.3f}"
                    f" ({s['over_bare_s']['min']:+.3f} .. {s['over_bare_s']['max']:+.3f}), "
                    f"liveupdated's share {s['liveupdated_share_s']['median']:.3f} s")
        rows.append("   " + " | ".join(f"{k} {v:.3f}" for k, v in s["phases_s"].items()))
        rows.append(f"   daemon start {s['daemon_start_s']['median']:.3f} s; RetrieveFd / "
                    f"PreserveFd {s['retrieve_ratio']['median']:.2f}"
                    + (f"; start / import {s['start_ratio']['median']:.2f}"
                       if "start_ratio" in s else ""))
    for key, met in results["met"].items():
        value = results.get(key)
        shown = f"{value:8.3f}" if value is not None else "     n/a"
        verdict = ("not judged: stood in for by " + results["stand_in"][key]
                   if met is None else "met" if met else "NOT met")
        rows.append(f"{key:32} {shown}  {verdict}")
    for label, why in results.get("skipped", {}).items():
        rows.append(f"{label} skipped: {why}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
