"""liveupdated installed from its .deb in a booted container, and the probes the service
tests use on it: systemctl, busctl (--json), journalctl and the VMM stand-in (vmm.py)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .container import Container

REPO = Path(__file__).resolve().parents[2]
UNIT = "liveupdated.service"
PYTHON = "/usr/lib/liveupdated/bin/python"
VMM = "/opt/liveupdated-tests/vmm.py"
HANDOVER = "/var/lib/liveupdated/handover"
MANAGER = ("org.liveupdate1", "/org/liveupdate1", "org.liveupdate1.Manager")

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll `check` until it returns something other than None; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def build_wheels(out: Path, python_version: str = "") -> Path:
    """packaging/build-wheels.sh: liveupdated and its dependencies, built on the host (and
    the compiled ones downloaded for `python_version`, the guest's, when given)."""
    extra = ["--python-version", python_version] if python_version else []
    host_run([str(REPO / "packaging/build-wheels.sh"), str(out), *extra])
    return out


def guest_python_version(root: Path) -> str:
    """X.Y of a Debian root's python3 (its /usr/bin/python3 -> python3.X symlink)."""
    target = (root / "usr/bin/python3").readlink().name
    return target.removeprefix("python")


def build_deb(out: Path, wheels: Path, sysroot: Path) -> Path:
    """packaging/build-deb.sh, its venv built on the Python of `sysroot`."""
    stdout = host_run(
        [str(REPO / "packaging/build-deb.sh"), str(out), "--wheels", str(wheels),
         "--sysroot", str(sysroot)]
    )
    return Path(stdout.strip().splitlines()[-1])


def host_run(argv: list[str]) -> str:
    result = subprocess.run(argv, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{argv} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result.stdout


_LEVELS = {"2": "critical", "3": "error", "4": "warning", "6": "info", "7": "debug"}
_NATIVE = {"SESSION": "session", "TOKEN": "token", "PHASE": "phase"}
_INTEGER = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?[0-9]+\.[0-9]+(?:e[-+]?[0-9]+)?")


def logged_event(entry: dict[str, Any]) -> dict[str, Any]:
    """The daemon's event (`event`, `level` and its fields) from a journal entry: a JSON
    MESSAGE (releases before native fields, and the fallback line), else the native fields
    of liveupdated/logs.py (LIVEUPDATED_<KEY>, SESSION, TOKEN, PHASE), numbers as numbers."""
    message = entry.get("MESSAGE")
    if isinstance(message, str) and message.startswith("{"):
        parsed: dict[str, Any] = json.loads(message)
        return parsed
    event: dict[str, Any] = {"level": _LEVELS.get(str(entry.get("PRIORITY")), "")}
    for key, value in entry.items():
        if key.startswith("LIVEUPDATED_"):
            name = key.removeprefix("LIVEUPDATED_").lower()
        elif key in _NATIVE:
            name = _NATIVE[key]
        else:
            continue
        if not isinstance(value, str):
            continue  # not UTF-8: journalctl gives bytes; no test reads those
        number: Any = (int(value) if _INTEGER.fullmatch(value)
                       else float(value) if _FLOAT.fullmatch(value) else value)
        event.setdefault(name, number)
    return event


class Installed:
    """A container with the liveupdated package installed (enabled, started by postinst)."""

    def __init__(self, box: Container, handover: Path, package: str) -> None:
        self.box = box
        self.handover = handover  # the host side of HANDOVER
        self.package = package  # the .deb inside

    @classmethod
    def install(cls, box: Container, deb: Path, handover: Path) -> Installed:
        """apt install the .deb, its unit as shipped (no drop-in), with the VMM stand-in
        beside it."""
        box.copy_in(Path(__file__).with_name("vmm.py"), VMM)
        installed = cls(box, handover, f"/var/tmp/{deb.name}")
        box.copy_in(deb, installed.package)
        installed.apt_install()
        return installed

    def apt_install(self, *options: str) -> None:
        # No fsync per file (a throwaway container): 2 s less per install.
        unsafe_io = "--option=Dpkg::Options::=--force-unsafe-io"
        self.box.run(["apt-get", "install", "--yes", "--quiet", unsafe_io, *options, self.package])

    # -- systemd -----------------------------------------------------------------------

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.box.run(["systemctl", *args], check=check).stdout.strip()

    def show(self, *props: str) -> dict[str, str]:
        out = self.systemctl("show", UNIT, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines())

    def wait_restarted(self, before: dict[str, str]) -> dict[str, str]:
        """After a crash: wait for systemd's restart (NRestarts up) to be READY again."""

        def restarted() -> dict[str, str] | None:
            now = self.show("MainPID", "NRestarts", "ActiveState", "SubState")
            up = now["ActiveState"] == "active" and now["SubState"] == "running"
            newer = int(now["NRestarts"]) > int(before["NRestarts"])
            return now if up and newer and now["MainPID"] != before["MainPID"] else None

        return wait_for(restarted, "liveupdated restarted by systemd")

    def fd_store(self) -> int:
        """The VMs' fds in the unit's store: all but the daemon's journal watermark, which
        is there whenever anything is (the daemon stores it first)."""
        return max(0, int(self.show("NFileDescriptorStore")["NFileDescriptorStore"]) - 1)

    def wait_status(self, text: str) -> None:
        """Wait until the unit's StatusText is `text` (STATUS= follows changes at most ten
        times a second)."""
        wait_for(lambda: True if self.show("StatusText")["StatusText"] == text else None,
                 f"StatusText={text!r}", timeout=10)

    def wait_fd_store(self, count: int) -> None:
        """Wait until systemd holds `count` fds for the unit (FDSTORE= is asynchronous)."""
        seen: list[int] = []

        def settled() -> bool | None:
            seen.append(self.fd_store())
            return True if seen[-1] == count else None

        try:
            wait_for(settled, f"NFileDescriptorStore={count}", timeout=10)
        except TimeoutError:
            raise AssertionError(f"NFileDescriptorStore is {seen[-1]}, not {count}") from None

    def journal(self, priority: str) -> list[dict[str, Any]]:
        """The daemon's own journal entries up to `priority`, their MESSAGE replaced by the
        event as logged (see `logged_event`)."""
        out = self.box.run(
            ["journalctl", "--unit", UNIT, "--priority", priority, "--output", "json",
             "--no-pager"]
        ).stdout
        entries = [json.loads(line) for line in out.splitlines()]
        return [
            {**entry, "MESSAGE": logged_event(entry)}
            for entry in entries
            if entry.get("SYSLOG_IDENTIFIER") == "liveupdated"
            and entry.get("_SYSTEMD_UNIT") == UNIT
        ]

    def wait_logged(self, priority: str, event: str) -> dict[str, Any]:
        """The last journal entry of the daemon's `event`, once journald has it."""

        def logged() -> dict[str, Any] | None:
            found = [e for e in self.journal(priority) if e["MESSAGE"].get("event") == event]
            return found[-1] if found else None

        return wait_for(logged, f"{event} in the journal at -p {priority}")

    # -- D-Bus -------------------------------------------------------------------------

    def busctl(self, *args: str) -> Any:
        out = self.box.run(["busctl", "--system", "--json=short", *args]).stdout
        return json.loads(out) if out.strip() else None

    def prop(self, name: str) -> Any:
        return self.busctl("get-property", *MANAGER, name)["data"]

    def call(self, member: str) -> None:
        self.busctl("call", *MANAGER, member)

    def sessions(self) -> list[list[Any]]:
        rows: list[list[Any]] = self.busctl("call", *MANAGER, "ListSessions")["data"][0]
        return rows

    def held_fds(self) -> int:
        return sum(row[4] for row in self.sessions())

    # -- the VMM stand-in ----------------------------------------------------------------

    def start_vmm(self, session: str) -> dict[str, Any]:
        """Start a VMM unit that hands over its memfds and stays; return their fingerprints."""
        out = f"/var/tmp/{session}.json"
        self.box.run(
            ["systemd-run", f"--unit=vmm-{session}", "--property=Type=notify",
             "--property=NotifyAccess=main", "--quiet", "--", PYTHON, VMM, "hold", session,
             out]
        )  # returns once the unit is READY=1, i.e. after the fds were handed over
        prints: dict[str, Any] = json.loads(self.box.run(["cat", out]).stdout)
        return prints

    def vmm_files(self, session: str) -> dict[str, Any]:
        """(st_dev, st_ino) of each memfd the VMM of `session` handed over."""
        files: dict[str, Any] = json.loads(
            self.box.run(["cat", f"/var/tmp/{session}.json.files"]).stdout
        )
        return files

    def vmm_finish_race(self, *sessions: str) -> dict[str, Any]:
        """Session.Finish of each and Manager.Finish pipelined, by a new client."""
        report: dict[str, Any] = json.loads(
            self.box.run_unit([PYTHON, VMM, "finish-race", *sessions]).stdout
        )
        return report

    def vmm_show(self, session: str) -> dict[str, Any]:
        """ListSessions, ListFds and the fingerprints of RetrieveFd, by a new client."""
        report: dict[str, Any] = json.loads(
            self.box.run_unit([PYTHON, VMM, "show", session]).stdout
        )
        return report
