"""The test inside the QEMU guest: a VMM hands memfds to the installed liveupdated, the
host side of the update goes through busctl (Prepare, Cancel, Prepare, Freeze, Reboot),
the kernel kexecs into itself with LUO, and the next boot checks that every fd comes back
byte-exact and that Finish, pipelined with each session's Session.Finish, leaves the
kernel holding no session. Run by luo-test.service
with liveupdated's own venv python.

  guest.py run          the stage this boot is in (by /var/lib/luo-test/stage)
  guest.py vmm OUT      the VMM: create sessions, hand over memfds, write their
                        fingerprints to OUT, then stay connected until killed

Progress goes to the serial console as `LUO-TEST <event> <json>` lines for the host.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from liveupdated.backends import luo_uapi
from liveupdated.backends.kernel import INDEX_SESSION
from liveupdated.client import Client
from liveupdated.fds import memfd

STATE = Path("/var/lib/luo-test")
KERNEL = Path("/boot/vmlinuz-luo")
MIB = 1 << 20
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
STATE_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
BUSCTL = ["busctl", "--system", "call", "org.liveupdate1", "/org/liveupdate1",
          "org.liveupdate1.Manager"]
SESSIONS = {"vm1": ("guest-ram", "vm-state"), "vm2": ("guest-ram",)}


def say(event: str, **fields: Any) -> None:
    """One line on the console (the host reads and timestamps it) and in the journal."""
    line = f"LUO-TEST {event} {json.dumps(fields, sort_keys=True)}\n"
    with open("/dev/console", "w") as console:
        console.write(line)
    print(line, end="", flush=True)


# ---- the VMM ------------------------------------------------------------------------------


def guest_ram(seed: int, size: int) -> int:
    """Sparse guest memory: random data at scattered pages, a known tail, a file position."""
    fd = os.memfd_create(f"guest-ram-{seed}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    rng = random.Random(seed)
    for slot in sorted(rng.sample(range(size // MIB - 1), 5)):
        os.pwrite(fd, rng.randbytes(64 << 10), slot * MIB + rng.randrange(16) * 4096)
    os.pwrite(fd, b"end of guest memory", size - 4096)
    os.lseek(fd, 3 * 4096, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def vm_state() -> int:
    fd = os.memfd_create("vm-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, json.dumps({"vcpus": 2, "devices": ["virtio-blk"]}).encode())
    os.write(fd, bytes(range(256)) * 16)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, STATE_SEALS)
    return fd


def facts(fd: int) -> dict[str, Any]:
    """What must come back: content (whole file, holes read as zeros), size, seals, name,
    position and the data extents (sparseness)."""
    position = os.lseek(fd, 0, os.SEEK_CUR)
    size = os.fstat(fd).st_size
    digest = hashlib.sha256()
    for offset in range(0, size, 16 * MIB):
        digest.update(os.pread(fd, min(16 * MIB, size - offset), offset))
    extents = memfd.data_extents(fd, size)
    os.lseek(fd, position, os.SEEK_SET)
    return {
        "size": size,
        "sha256": digest.hexdigest(),
        "seals": memfd.seals_of(fd),
        "name": memfd.memfd_name(os.readlink(f"/proc/self/fd/{fd}")),
        "position": position,
        "extents": extents,
    }


async def vmm(out: Path) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    fds = {
        ("vm1", "guest-ram"): guest_ram(1, 32 * MIB),
        ("vm1", "vm-state"): vm_state(),
        ("vm2", "guest-ram"): guest_ram(2, 8 * MIB),
    }
    async with await Client.connect("system") as client:
        for name, tokens in SESSIONS.items():
            session = await client.create_session(name)
            for token in tokens:
                requires = ["guest-ram"] if token == "vm-state" else []
                await session.preserve_fd(token, fds[name, token], requires)
        prints = {f"{s}/{t}": facts(fd) for (s, t), fd in fds.items()}
        partial = out.with_suffix(".partial")
        partial.write_text(json.dumps(prints))
        os.rename(partial, out)
        await stop.wait()


async def fds_back() -> tuple[dict[str, Any], dict[str, str]]:
    """The facts of every fd retrieved, and the names Session.FdNames gives for them."""
    async with await Client.connect("system") as client:
        prints, names = {}, {}
        for name, tokens in SESSIONS.items():
            session = await client.retrieve_session(name)
            names.update({f"{name}/{t}": n for t, n in (await session.fd_names()).items()})
            for token in tokens:
                fd = await session.retrieve_fd(token)
                try:
                    prints[f"{name}/{token}"] = facts(fd)
                finally:
                    os.close(fd)
        return prints, names


async def finish_race(names: list[str]) -> list[str]:
    """Session.Finish of every VM pipelined with Manager.Finish on one connection, the
    manager's sent second: what each call answered ("done", or the error's name). The
    backend must let go of each session once, whichever the daemon decides first."""
    async with await Client.connect("system") as client:
        sessions = [await client.retrieve_session(name) for name in names]
        calls = [sessions[0].finish(), client.finish(), *(s.finish() for s in sessions[1:])]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    return ["done" if o is None else type(o).__name__ for o in outcomes]


# What LUO does not carry, and the kernel backend no longer hides with a copy: the name
# (the memfd comes back nameless; FdNames has it) and the holes (every page allocated).
NOT_CARRIED = ("name", "extents")


# ---- the host's side of the update, and the checks -----------------------------------------


def busctl(*args: str) -> str:
    return subprocess.run(BUSCTL + list(args), check=True, capture_output=True,
                          text=True).stdout.strip()


def state() -> str:
    out = subprocess.run(
        ["busctl", "--system", "get-property", "org.liveupdate1", "/org/liveupdate1",
         "org.liveupdate1.Manager", "State"], check=False, capture_output=True, text=True)
    return out.stdout.split('"')[1] if out.returncode == 0 else ""


def wait_for_state(wanted: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := state()) != wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"liveupdated state {seen!r}, not {wanted!r}, after {timeout}s")
        time.sleep(0.1)


def kernel_sessions_left() -> list[str]:
    """Sessions the kernel still hands over (needs /dev/liveupdate: stop liveupdated)."""
    device = luo_uapi.open_device()
    left = []
    try:
        for name in [*SESSIONS, INDEX_SESSION]:
            try:
                os.close(luo_uapi.retrieve_session(device, name))
                left.append(name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
    finally:
        os.close(device)
    return left


def stage_before() -> None:
    say("boot", stage="before", boot_id=boot_id(), backend=busctl_property("Backend"))
    wait_for_state("normal")
    before = STATE / "before.json"
    before.unlink(missing_ok=True)
    vmm_process = subprocess.Popen([sys.executable, __file__, "vmm", str(before)])
    while not before.exists():
        if vmm_process.poll() is not None:
            raise RuntimeError(f"the VMM exited with {vmm_process.returncode}")
        time.sleep(0.05)
    say("handed_over", fds=len(json.loads(before.read_text())))
    busctl("Prepare")
    busctl("Cancel")  # the kernel unpreserves everything: the next Prepare can take it all again
    busctl("Prepare")
    say("prepared", after_cancel=True)
    busctl("Freeze")
    say("frozen")
    subprocess.run([sys.executable, "-m", "liveupdated.backends.luo_uapi", "load", str(KERNEL)],
                   check=True)  # with this boot's command line
    (STATE / "stage").write_text(f"after {boot_id()}\n")
    os.sync()
    say("rebooting", kexec_loaded=luo_uapi.kexec_loaded())
    busctl("Reboot")  # the daemon runs its reboot action; this process dies with the rest
    say("reboot_returned", holders=holders())
    time.sleep(600)
    raise TimeoutError("no kexec within 600 s of Reboot()")


def stage_after(previous_boot: str) -> dict[str, Any]:
    say("boot", stage="after", boot_id=boot_id(), previous_boot=previous_boot)
    wait_for_state("updated")
    say("updated")
    say("crashed", restarts=crash_daemon())  # before any fd is back: they must survive it
    back, names = asyncio.run(fds_back())
    after = json.loads(json.dumps(back))  # as JSON, like `before`
    say("fds_back", fds=len(after))
    before = json.loads((STATE / "before.json").read_text())

    def carried(fd_facts: dict[str, Any] | None) -> dict[str, Any] | None:
        if fd_facts is None:
            return None
        return {k: v for k, v in fd_facts.items() if k not in NOT_CARRIED}

    mismatches = {
        key: {"before": before.get(key), "after": after.get(key)}
        for key in sorted(set(before) | set(after))
        if carried(before.get(key)) != carried(after.get(key))
    }
    say("not_carried", **{key: {k: after[key][k] for k in NOT_CARRIED} for key in after})
    names_wrong = {key: {"before": facts_["name"], "fd_names": names.get(key)}
                   for key, facts_ in before.items() if names.get(key) != facts_["name"]}
    cursor = journal_cursor()
    finished = asyncio.run(finish_race(list(SESSIONS)))
    wait_for_state("normal")
    say("finished", answers=finished)
    subprocess.run(["systemctl", "stop", "liveupdated.service"], check=True)
    left = kernel_sessions_left()
    return {"boot_changed": previous_boot != boot_id(), "mismatches": mismatches,
            "names_wrong": names_wrong, "finish_answers": finished,
            "daemon_errors": errors_since(cursor),
            "kernel_sessions_left": left, "fds": sorted(after)}


def journal_cursor() -> str:
    """Where the system journal ends now."""
    out = subprocess.run(["journalctl", "-q", "-n", "1", "-o", "cat", "--show-cursor"],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().rsplit("-- cursor: ", 1)[1]


def errors_since(cursor: str) -> list[str]:
    """What liveupdated itself logged at error or worse after `cursor`."""
    out = subprocess.run(["journalctl", "-q", "-o", "cat", "-p", "err", f"--after-cursor={cursor}",
                          "_SYSTEMD_UNIT=liveupdated.service"],
                         check=True, capture_output=True, text=True).stdout
    return [line for line in out.split("\n") if line]


def crash_daemon(timeout: float = 120.0) -> int:
    """kill -9 liveupdated in UPDATED; systemd restarts it with its fd store, which holds
    the kernel sessions it retrieved (closing them would finish them). Its NRestarts."""
    def restarts() -> int:
        out = subprocess.run(["systemctl", "show", "--property=NRestarts", "--value",
                              "liveupdated.service"], check=True, capture_output=True,
                             text=True).stdout
        return int(out.strip() or 0)

    before = restarts()
    subprocess.run(["systemctl", "kill", "--kill-who=main", "--signal=KILL",
                    "liveupdated.service"], check=True)
    deadline = time.monotonic() + timeout
    while restarts() == before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"liveupdated not restarted within {timeout}s of a kill -9")
        time.sleep(0.1)
    wait_for_state("updated", timeout)
    return restarts()


def holders() -> dict[str, list[str]]:
    """What each '@' process (spared by systemd-shutdown) holds open."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"@"):
                fds = Path(f"/proc/{pid}/fd")
                found[pid] = sorted(os.readlink(fds / n) for n in os.listdir(fds))
        except OSError:
            continue
    return found


def busctl_property(name: str) -> str:
    out = subprocess.run(
        ["busctl", "--system", "get-property", "org.liveupdate1", "/org/liveupdate1",
         "org.liveupdate1.Manager", name], check=False, capture_output=True, text=True)
    return out.stdout.strip()


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def run() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    stage_file = STATE / "stage"
    stage = stage_file.read_text().split() if stage_file.exists() else ["before"]
    try:
        if stage[0] == "before":
            stage_before()
            return
        if stage[0] == "after":
            stage_file.write_text("done\n")
            result = stage_after(stage[1])
            say("result", **result)
        else:
            say("result", error=f"booted again in stage {stage[0]!r}: the kexec went wrong")
    except Exception as exc:
        say("result", error=f"{type(exc).__name__}: {exc}")
    finally:
        if stage[0] != "before":
            os.sync()
            subprocess.run(["systemctl", "poweroff", "--force", "--force"], check=False)


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["run"]:
            run()
        case ["vmm", out]:
            asyncio.run(vmm(Path(out)))
        case _:
            sys.exit(__doc__)
