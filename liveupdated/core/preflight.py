"""The preflight of an update (Manager.Check): can Prepare, Freeze and Reboot succeed now?

`verdicts(core, facts)` is pure: the core's state plus the facts the daemon gathered
(`Facts`) into one verdict per item, `ok`, `fail` or `warn`, each with a detail a
person reads. It changes nothing. `gather(...)` is the one part that looks at the host
(statvfs, /sys/kernel/kexec_loaded, fstat of the held fds); it takes the daemon's
objects as parameters and is called off the event loop.
"""

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from liveupdated.contract import CHECK_FAIL as FAIL
from liveupdated.contract import CHECK_ITEMS as ITEMS
from liveupdated.contract import CHECK_OK as OK
from liveupdated.contract import CHECK_VERDICTS as VERDICTS
from liveupdated.contract import CHECK_WARN as WARN
from liveupdated.core.orchestrator import Orchestrator, Phase

# The items (in the order they are checked and reported: docs/API.md lists them) and
# their verdicts are the contract's: clients read the reply by them.
__all__ = ["FAIL", "ITEMS", "OK", "VERDICTS", "WARN", "Facts", "Item", "failures", "gather",
           "passed", "verdicts"]

Item = tuple[str, str, str]  # item, verdict, detail


@dataclass(frozen=True)
class Facts:
    """What only the daemon and the host can tell, gathered for one Check."""

    backend: str  # the backend that runs: simulated, kernel, fdstore
    reboot_action: str  # exit, kexec, soft-reboot or a command
    kexec_loaded: bool | None = None  # /sys/kernel/kexec_loaded; None: not asked
    # session, token, why: each held fd the backend would not carry
    unsupported: tuple[tuple[str, str, str], ...] = ()
    free_bytes: int | None = None  # room for the handover; None: the backend needs none
    storage_problem: str = ""  # the daemon is degraded: why


def _needs_kexec_kernel(facts: Facts) -> bool:
    """Only a kexec needs a loaded kernel: `systemctl kexec` loads one itself."""
    return facts.reboot_action == "kexec"


def verdicts(core: Orchestrator, facts: Facts) -> list[Item]:
    """One verdict per item of ITEMS, in that order."""
    items: list[Item] = []

    def say(item: str, verdict: str, detail: str) -> None:
        items.append((item, verdict, detail))

    if facts.storage_problem:
        say("state", FAIL, f"degraded, the journal cannot be written: {facts.storage_problem}")
    elif core.phase is not Phase.NORMAL or core.in_flight:
        busy = f" ({core.in_flight} under way)" if core.in_flight else ""
        say("state", FAIL, f"the state is {core.phase.value}{busy}: an update starts in "
                           "normal (Cancel or Finish the one under way)")
    else:
        say("state", OK, "normal")

    say("backend", OK, facts.backend)

    if facts.reboot_action == "exit":
        say("reboot-action", WARN, "exit: the daemon stops after Reboot and nothing reboots "
                                   "(a test setup, or something else reboots the host)")
    else:
        say("reboot-action", OK, facts.reboot_action)

    if not _needs_kexec_kernel(facts):
        say("kexec-kernel", OK, f"not needed by the reboot action {facts.reboot_action!r}")
    elif facts.kexec_loaded:
        say("kexec-kernel", OK, "loaded (/sys/kernel/kexec_loaded is 1)")
    else:
        say("kexec-kernel", FAIL, "no kexec kernel is loaded (/sys/kernel/kexec_loaded is "
                                  "0): load the next kernel first (kexec -s -l KERNEL "
                                  "--reuse-cmdline)")

    if facts.unsupported:
        say("fd-kinds", FAIL, f"the {facts.backend} backend cannot carry: " + "; ".join(
            f"{session}/{token} ({why})" for session, token, why in facts.unsupported))
    else:
        say("fd-kinds", OK, f"{core.fd_count()} fds, all of a kind the {facts.backend} "
                            "backend carries")

    if core.quarantine:
        names = ", ".join(f"{q.id} ({q.session}/{q.token})" for q in core.quarantine.values())
        say("quarantine", FAIL, f"quarantined fds ({names}) would not survive the reboot: "
                                "liveupdatectl quarantine retrieve or release them first")
    else:
        say("quarantine", OK, "empty")

    missing = core.missing_dependencies()
    if missing:
        say("requires", FAIL, "missing: " + "; ".join(missing))
    else:
        say("requires", OK, "every required fd is held")

    needed = core.total_preserved_bytes()
    if facts.free_bytes is None:
        say("handover-room", OK, f"the {facts.backend} backend writes no handover area")
    elif facts.free_bytes < needed:
        say("handover-room", FAIL, f"the handover needs up to {needed} bytes, its "
                                   f"filesystem has {facts.free_bytes} free")
    else:
        say("handover-room", OK, f"up to {needed} bytes needed, {facts.free_bytes} free")
    return items


def passed(items: Iterable[Item]) -> bool:
    """Nothing failed (a warning does not stop an update)."""
    return all(verdict != FAIL for _, verdict, _ in items)


def failures(items: Iterable[Item]) -> str:
    """The failed items on one line."""
    return "; ".join(f"{item}: {detail}" for item, verdict, detail in items if verdict == FAIL)


# ---- the facts, from the daemon's objects (I/O: call it in a worker thread) -----------

KEXEC_LOADED = Path("/sys/kernel/kexec_loaded")


def _kexec_loaded(path: Path = KEXEC_LOADED) -> bool:
    try:
        return path.read_text().strip() == "1"
    except OSError:
        return False


def _free_bytes(area: Path) -> int:
    """Free bytes for an unprivileged-or-not writer on the area's filesystem (the area
    itself may not exist yet: its nearest existing parent is asked)."""
    probe = area
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


class _Carrier(Protocol):
    """What Check asks of the running backend: the part of backends.Backend it needs,
    restated so that the core does not import the backends (they import the core)."""

    name: str

    def handover_area(self) -> Path | None: ...


def gather(
    backend: _Carrier,
    reboot_action: str,
    held: Mapping[tuple[str, str], int],
    inspect: Callable[[int], object],
    storage_problem: str = "",
) -> Facts:
    """The facts of one Check: `backend` is the running backend (its name, and the
    directory its handover is written to, if any), `held` the fds held by key, `inspect`
    the fd handler's check (raises for an fd of a kind no backend carries)."""
    unsupported = []
    for (session, token), fd in sorted(held.items()):
        try:
            inspect(fd)
        except Exception as exc:  # the handler's refusal, whatever its class
            unsupported.append((session, token, " ".join(str(exc).split())))
    area = backend.handover_area()
    return Facts(
        backend=backend.name,
        reboot_action=reboot_action,
        kexec_loaded=_kexec_loaded() if reboot_action == "kexec" else None,
        unsupported=tuple(unsupported),
        free_bytes=_free_bytes(area) if area is not None else None,
        storage_problem=storage_problem,
    )
