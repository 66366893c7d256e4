"""Helpers of the core's rule tests (tests/core/test_*.py); it holds no tests itself.

The core is driven as the service drives it, with no bus, no daemon and no I/O: a host
command holds `in_flight` from its decision until `done`, as the service's effects do.
"""

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from liveupdated.core.errors import LiveUpdateError
from liveupdated.core.orchestrator import Caller, FdFacts, Limits, Orchestrator, Phase
from liveupdated.core.records import Record

ROOT = Caller(uid=0, unit="", client=":1.1", admin=True)
ALICE = Caller(uid=1000, unit="vmm@a.service", client=":1.2", admin=False)
BOB = Caller(uid=1001, unit="", client=":1.3", admin=False)
VM = "1000-vm"  # ALICE's session: a non-admin's session names start with its uid
PAGE = 4096


def facts(size: int = PAGE, name: str = "ram") -> FdFacts:
    return FdFacts(kind="memfd", size=size, name=name, seals=0)


def new_core(limits: Limits | None = None) -> Orchestrator:
    """A core with a clock that moves 1 ms a reading, so that times can be compared."""
    clock = itertools.count(1_000_000, 1_000)
    return Orchestrator(limits, clock_usec=lambda: next(clock))


def core_with(
    *tokens: str, owner: Caller = ALICE, name: str = VM, limits: Limits | None = None
) -> Orchestrator:
    """A core in normal with one session of `owner` holding a page under each token."""
    core = new_core(limits)
    core.create_session(owner, name)
    for token in tokens:
        core.preserve_fd(owner, name, token, [], facts())
    return core


# ---- the host commands, whole, as the service runs them -------------------------------


def prepare(core: Orchestrator, caller: Caller = ROOT) -> list[Record]:
    records = core.prepare(caller)
    core.done("Prepare")
    return records


def freeze(core: Orchestrator, caller: Caller = ROOT) -> list[Record]:
    attempt = core.begin_freeze(caller)
    try:
        return core.freeze(caller, sizes_now(core), attempt)
    finally:
        core.done("Freeze", attempt)


def sizes_now(core: Orchestrator) -> dict[tuple[str, str], int]:
    """Every held fd's size as preserved: no memfd grew since."""
    return {(s.name, t): e.size for s in core.sessions.values() for t, e in s.fds.items()}


def cancel(core: Orchestrator, caller: Caller = ROOT) -> list[Record]:
    records = core.cancel(caller)
    core.done("Cancel")
    return records


def finish(core: Orchestrator, caller: Caller = ROOT) -> list[Record]:
    records = core.finish(caller)
    core.done("Finish")
    return records


def updated(core: Orchestrator) -> Orchestrator:
    """Prepare, Freeze, Reboot and the new boot's start: the core in updated."""
    prepare(core)
    freeze(core)
    core.begin_reboot(ROOT, "old-boot")
    core.rebooted("new-boot")
    assert core.phase is Phase.UPDATED
    return core


def in_phase(phase: Phase, *tokens: str) -> Orchestrator:
    """A core in `phase` with ALICE's session VM holding `tokens`."""
    core = core_with(*tokens)
    if phase is Phase.UPDATED:
        return updated(core)
    if phase in (Phase.PREPARED, Phase.FROZEN):
        prepare(core)
    if phase is Phase.FROZEN:
        freeze(core)
    assert core.phase is phase
    return core


def replayed(records: list[Record], limits: Limits | None = None) -> Orchestrator:
    """A fresh core that applied `records`: what a restart rebuilds from the journal."""
    core = Orchestrator(limits)
    for record in records:
        core.apply(record)
    return core


# ---- a refused command changes nothing ------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What a refused command must leave as it was: the durable state (the snapshot
    compaction would write), the host command under way, and the budgets' counters."""

    snapshot: list[Record]
    in_flight: str
    freeze_attempt: int
    fds: int
    bytes: int
    by_uid: dict[int, tuple[int, int]]


def seen(core: Orchestrator) -> Seen:
    return Seen(core.snapshot(), core.in_flight, core.freeze_attempt, core.fd_count(),
                core.total_preserved_bytes(),
                {c.uid: core.uid_usage(c.uid) for c in (ROOT, ALICE, BOB)})


@contextlib.contextmanager
def refused(
    core: Orchestrator, error: type[LiveUpdateError], match: str = ""
) -> Iterator[pytest.ExceptionInfo[LiveUpdateError]]:
    """The block raises `error` (its message matching `match`) and changes nothing."""
    before = seen(core)
    with pytest.raises(error, match=match or None) as raised:
        yield raised
    assert seen(core) == before, "a refused command changed the core"
