"""The test inside the sid guest (systemd 262 as PID 1 on the LUO kernel): VMM units hand
memfds to the installed liveupdated, which runs the fdstore backend (picked by `auto`);
busctl plays the host (Prepare, Freeze, Reboot with --reboot-action kexec): liveupdated
asks systemd for the kexec, and PID 1 carries every fd store through LUO
(FileDescriptorStorePreserve=yes). The next boot checks that liveupdated sees the new boot
(KExecCount grew), that every fd comes back byte-exact, that the unrelated keeper.service
kept its store too, that no one holds /dev/liveupdate and that after Finish (pipelined
with each VM's Session.Finish) the kernel hands over no session of liveupdated's. Run by
luo-fdstore-test.service with liveupdated's own venv python, beside guest.py (shared
helpers).

  guest_fdstore.py run              the stage this boot is in (/var/lib/luo-test/stage)
  guest_fdstore.py vmm SESSION OUT  a VMM (a Type=notify unit): create SESSION, hand over
                                    its memfds, write their fingerprints to OUT, READY=1,
                                    then stay connected until SIGTERM

With `luotest.no_kexec_load` on the kernel command line no kexec kernel is loaded before
Reboot (what a forgotten `kexec -l` does: systemd reboots plainly and the stores are lost).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from liveupdated.backends import luo_uapi
from liveupdated.backends.kernel import INDEX_SESSION
from liveupdated.client import Client

if TYPE_CHECKING:
    from tests.kernel import guest
else:  # in the guest, guest.py is beside this file
    import guest

SESSIONS = {"vm-k1": ("guest-ram", "vm-state"), "vm-k2": ("guest-ram",)}
RAM = {"vm-k1": 32 * guest.MIB, "vm-k2": 8 * guest.MIB}
UNIT = "liveupdated.service"
KEEPER_LOG = Path("/var/tmp/keeper.jsonl")
DEVICE = luo_uapi.DEVICE
# What the kexec carries and what it cannot: the memfd's name ("memfd:" + "/ (deleted)"
# after LUO), and its holes (preserving pins every page).
NOT_CARRIED = ("name", "extents")


# ---- the VMM ------------------------------------------------------------------------------


def notify(message: bytes) -> None:
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.send(message)


async def vmm(name: str, out: Path) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    seed = sorted(SESSIONS).index(name) + 1
    fds = {"guest-ram": guest.guest_ram(seed, RAM[name]), "vm-state": guest.vm_state()}
    async with await Client.connect("system") as client:
        session = await client.create_session(name)
        for token in SESSIONS[name]:
            requires = ["guest-ram"] if token == "vm-state" else []
            await session.preserve_fd(token, fds[token], requires)
        prints = {f"{name}/{token}": guest.facts(fds[token]) for token in SESSIONS[name]}
        partial = out.with_suffix(".partial")
        partial.write_text(json.dumps(prints))
        os.rename(partial, out)
        notify(b"READY=1")
        await stop.wait()


async def fds_back() -> dict[str, Any]:
    async with await Client.connect("system") as client:
        prints = {}
        for name, tokens in SESSIONS.items():
            session = await client.retrieve_session(name)
            for token in tokens:
                fd = await session.retrieve_fd(token)
                try:
                    prints[f"{name}/{token}"] = guest.facts(fd)
                finally:
                    os.close(fd)
        return prints


# ---- systemd and the kernel, as seen from the guest ----------------------------------------


def show(unit: str | None, prop: str) -> str:
    argv = ["systemctl", "show", "--value", "-p", prop, *([unit] if unit else [])]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def backend() -> str:
    out = subprocess.run(
        ["busctl", "--system", "get-property", "org.liveupdate1", "/org/liveupdate1",
         "org.liveupdate1.Manager", "Backend"], check=True, capture_output=True, text=True)
    return out.stdout.split('"')[1]


def stored() -> int:
    return int(show(UNIT, "NFileDescriptorStore"))


def wait_stored(count: int, timeout: float = 60.0) -> None:
    """liveupdated's fd store holds `count` VM fds (and its journal watermark)."""
    deadline = time.monotonic() + timeout
    while (seen := stored()) != count + 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"NFileDescriptorStore={seen}, not {count + 1}, after {timeout}s")
        time.sleep(0.1)


def device_holders() -> list[str]:
    """Processes holding /dev/liveupdate open (PID 1 must be free to open it at kexec)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fds = Path(f"/proc/{pid}/fd")
        try:
            if any(os.readlink(fds / n) == DEVICE for n in os.listdir(fds)):
                found.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
        except OSError:
            continue
    return found


def kernel_sessions_left() -> dict[str, str]:
    """Which of liveupdated's session names (and the kernel backend's index) the kernel
    would still hand over: none, since PID 1 carried the fds, not liveupdated."""
    device = luo_uapi.open_device()
    left = {}
    try:
        for name in [*SESSIONS, INDEX_SESSION]:
            try:
                os.close(luo_uapi.retrieve_session(device, name))
                left[name] = "retrievable"
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    left[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    finally:
        os.close(device)
    return left


def journal_events(event: str) -> list[dict[str, Any]]:
    """This boot's `event`s of the daemon, from the native fields it logs under systemd
    (LIVEUPDATED_<KEY>, liveupdated/logs.py): their fields, numbers as numbers."""
    out = subprocess.run(["journalctl", "-b", "-u", UNIT, "-o", "json", "--no-pager"],
                         check=True, capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        entry = json.loads(line)
        if entry.get("LIVEUPDATED_EVENT") != event:
            continue
        found.append({key.removeprefix("LIVEUPDATED_").lower():
                      int(value) if value.isdigit() else value
                      for key, value in entry.items()
                      if key.startswith("LIVEUPDATED_") and isinstance(value, str)})
    return found


def keeper_starts() -> list[dict[str, Any]]:
    if not KEEPER_LOG.exists():
        return []
    return [json.loads(line) for line in KEEPER_LOG.read_text().splitlines()]


# ---- the stages ------------------------------------------------------------------------


def stage_before() -> None:
    kexecs = int(show(None, "KExecCount"))
    guest.say("boot", stage="before", boot_id=guest.boot_id(), kexecs=kexecs,
              systemd=show(None, "Version"))
    guest.wait_for_state("normal")
    picked = backend()
    if picked != "fdstore":
        raise RuntimeError(f"auto picked the {picked} backend, not fdstore")
    keeper = keeper_starts()
    if [k["from_store"] for k in keeper] != [False]:
        raise RuntimeError(f"keeper.service started unexpectedly: {keeper}")
    for name in SESSIONS:
        out = guest.STATE / f"{name}.json"
        out.unlink(missing_ok=True)
        subprocess.run(["systemd-run", f"--unit=vmm-{name}", "--property=Type=notify",
                        "--property=NotifyAccess=main", "--quiet", "--", sys.executable,
                        __file__, "vmm", name, str(out)], check=True)
    before: dict[str, Any] = {}
    for name in SESSIONS:
        before.update(json.loads((guest.STATE / f"{name}.json").read_text()))
    (guest.STATE / "before.json").write_text(json.dumps(before))
    wait_stored(len(before))
    guest.say("handed_over", fds=len(before), stored=stored())
    guest.busctl("Prepare")
    guest.say("prepared")
    guest.busctl("Freeze")
    guest.say("frozen")
    holders = device_holders()
    if holders:
        raise RuntimeError(f"/dev/liveupdate is held before the kexec: {holders}")
    if " luotest.no_kexec_load " not in f" {Path('/proc/cmdline').read_text().strip()} ":
        subprocess.run([sys.executable, "-m", "liveupdated.backends.luo_uapi", "load",
                        str(guest.KERNEL)], check=True)  # kexec_file_load, this command line
    (guest.STATE / "stage").write_text(f"after {guest.boot_id()} {kexecs}\n")
    os.sync()
    guest.say("rebooting", kexec_loaded=luo_uapi.kexec_loaded(), holders=holders)
    guest.busctl("Reboot")  # liveupdated asks PID 1 for kexec.target; this unit is stopped too
    time.sleep(600)
    raise TimeoutError("no kexec within 600 s of Reboot()")


def stage_after(previous_boot: str, previous_kexecs: int) -> dict[str, Any]:
    kexecs = int(show(None, "KExecCount"))
    guest.say("boot", stage="after", boot_id=guest.boot_id(), previous_boot=previous_boot,
              kexecs=kexecs)
    guest.wait_for_state("updated", timeout=300)
    guest.say("updated")
    after = json.loads(json.dumps(asyncio.run(fds_back())))  # as JSON, like `before`
    guest.say("fds_back", fds=len(after))
    before = json.loads((guest.STATE / "before.json").read_text())
    mismatches, lost = {}, {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old is None or new is None:
            mismatches[key] = {"before": old, "after": new}
            continue
        carried = {k for k in old if k not in NOT_CARRIED}
        if any(old[k] != new.get(k) for k in carried):
            mismatches[key] = {k: [old[k], new.get(k)] for k in carried if old[k] != new.get(k)}
        lost[key] = {k: [old[k], new.get(k)] for k in NOT_CARRIED if old[k] != new.get(k)}
    found = journal_events("handover_found")
    holders_updated = device_holders()
    keeper = keeper_starts()
    cursor = guest.journal_cursor()
    finished = asyncio.run(guest.finish_race(list(SESSIONS)))
    guest.wait_for_state("normal")
    guest.say("finished", answers=finished)
    return {
        "boot_changed": previous_boot != guest.boot_id(),
        "kexecs": [previous_kexecs, kexecs],
        "backend": backend(),
        "handover_found": found[-1] if found else None,
        "finish_answers": finished,
        "daemon_errors": guest.errors_since(cursor),
        "fds": sorted(after),
        "mismatches": mismatches,
        "not_carried": lost,
        "keeper": keeper,
        "holders_updated": holders_updated,
        "holders_finished": device_holders(),
        "stored_after_finish": stored(),
        "kernel_sessions_left": kernel_sessions_left(),
    }


def run() -> None:
    guest.STATE.mkdir(parents=True, exist_ok=True)
    stage_file = guest.STATE / "stage"
    stage = stage_file.read_text().split() if stage_file.exists() else ["before"]
    failed = False
    try:
        if stage[0] == "before":
            stage_before()
            return
        if stage[0] == "after":
            stage_file.write_text("done\n")
            guest.say("result", **stage_after(stage[1], int(stage[2])))
        else:
            guest.say("result", error=f"booted again in stage {stage[0]!r}: the kexec went wrong")
    except Exception as exc:
        failed = True
        guest.say("result", error=f"{type(exc).__name__}: {exc}")
    finally:
        if stage[0] != "before" or failed:
            os.sync()
            subprocess.run(["systemctl", "poweroff", "--force", "--force"], check=False)


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["run"]:
            run()
        case ["vmm", name, out]:
            asyncio.run(vmm(name, Path(out)))
        case _:
            sys.exit(__doc__)
