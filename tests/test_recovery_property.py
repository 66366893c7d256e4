"""Recovery over every combination of evidence (core.recovery, pure): the phase at the
crash, which durable points were reached, the fd store full, partial, empty or with
unknown extra fds, the handover complete, partial, missing or damaged, boot evidence
present, absent or contradicting. Recovery never closes or deletes the last copy of an
acknowledged fd, and every acknowledged fd ends held for its owner, rebuilt, Corrupted,
or quarantined. A mutant that discards the handover as 0.3.0 did is caught."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from liveupdated.core import recovery as recovery_module
from liveupdated.core.orchestrator import Caller, FdFacts, Orchestrator, Phase
from liveupdated.core.records import DaemonStarted
from liveupdated.core.recovery import (
    Adopt,
    BootEvidence,
    Close,
    DiscardHandover,
    HandoverFound,
    Hold,
    HoldRenamed,
    Rebuild,
    Recovery,
    Spare,
    StartFacts,
    StoredFd,
    recover,
)

ROOT = Caller(uid=0, unit="", client=":1.1", admin=True)
BOOT, OTHER_BOOT = "boot-a", "boot-b"
PHASES = ["normal", "prepared", "frozen", "frozen-after-reboot", "updated"]
DEV = 9


@dataclass(frozen=True)
class Case:
    phase: str
    sessions: tuple[int, ...]  # fds per session
    had_store: bool
    store_survived: bool
    stored: tuple[bool, ...]  # per journaled fd: its file came back in the store
    strangers: tuple[str, ...]  # other stored fds: "same-name", "unknown", "garbage", "dup"
    handover: str  # complete, partial, missing, damaged
    boot: str  # same, new-boot-id, new-pid1, counts, none-readable
    damaged_journal: bool
    strangers_first: bool = False


def build(case: Case) -> tuple[Orchestrator, list[tuple[str, str, int]]]:
    """The core as replayed at the crash; the journaled fds as (session, token, ino)."""
    core = Orchestrator(clock_usec=lambda: 1)
    core.apply(DaemonStarted(version="t", boot_id=BOOT, at_usec=1, fd_store=case.had_store,
                             pid1_start=100))
    journaled: list[tuple[str, str, int]] = []
    ino = 1000
    for number, count in enumerate(case.sessions):
        name = f"vm-{number}"
        core.create_session(ROOT, name)
        for token_number in range(count):
            ino += 1
            token = f"fd{token_number}"
            core.preserve_fd(ROOT, name, token, (), FdFacts("memfd", 4096, "ram", 0, DEV, ino))
            journaled.append((name, token, ino))
    if case.phase != "normal":
        core.prepare(ROOT)
        core.done("Prepare")
    if case.phase in ("frozen", "frozen-after-reboot", "updated"):
        attempt = core.begin_freeze(ROOT)
        core.freeze(ROOT, {}, attempt)
        core.done("Freeze", attempt)
    if case.phase in ("frozen-after-reboot", "updated"):
        core.begin_reboot(ROOT, BOOT, soft_reboots=0, kexecs=0, pid1_start=100)
    if case.phase == "updated":
        core.rebooted(BOOT)
    return core, journaled


def facts_of(case: Case, journaled: list[tuple[str, str, int]]) -> StartFacts:
    stored: list[StoredFd] = []
    for (session, token, ino), came_back in zip(journaled, case.stored, strict=False):
        if came_back:
            stored.append(StoredFd(len(stored), f"{session}/{token}", DEV, ino, 4096))
    for number, kind in enumerate(case.strangers):
        ino = 5000 + number
        if kind == "same-name" and journaled:
            session, token, _ = journaled[number % len(journaled)]
            stored.append(StoredFd(len(stored), f"{session}/{token}", DEV, ino, 8192))
        elif kind == "dup" and stored:
            first = stored[number % len(stored)]
            stored.append(StoredFd(len(stored), first.name, first.dev, first.ino, first.size))
        elif kind == "unknown":
            stored.append(StoredFd(len(stored), f"ghost-{number}/ram", DEV, ino, 4096))
        else:
            stored.append(StoredFd(len(stored), f"gar:bage{number}", DEV, ino, 4096))
    if case.strangers_first:  # the store's order is systemd's: any
        ours = [fd for fd in stored if fd.ino < 5000]
        stored = [fd for fd in stored if fd.ino >= 5000] + ours
    stored = [StoredFd(i, fd.name, fd.dev, fd.ino, fd.size) for i, fd in enumerate(stored)]
    keys = frozenset((s, t) for s, t, _ in journaled)
    if case.handover == "partial":
        keys = frozenset(sorted(keys)[: len(keys) // 2])
    handover = {
        "complete": HandoverFound(BOOT, keys),
        "partial": HandoverFound(BOOT, keys),
        "missing": None,
        "damaged": HandoverFound("unknown", frozenset(), damage="checksum"),
    }[case.handover]
    boot = {
        "same": BootEvidence(BOOT, 100, 0, 0),
        "new-boot-id": BootEvidence(OTHER_BOOT, 100, 0, 0),
        "new-pid1": BootEvidence(BOOT, 200, 0, 0),
        "counts": BootEvidence(BOOT, 100, 1, 0),
        "none-readable": BootEvidence(BOOT, None, None, None),
    }[case.boot]
    return StartFacts(stored=tuple(stored), has_store=case.had_store,
                      store_survived=case.store_survived and case.had_store,
                      journal_damaged=case.damaged_journal, handover=handover, boot=boot)


cases = st.builds(
    Case,
    phase=st.sampled_from(PHASES),
    sessions=st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple),
    had_store=st.booleans(),
    store_survived=st.booleans(),
    stored=st.lists(st.booleans(), min_size=0, max_size=9).map(tuple),
    strangers=st.lists(st.sampled_from(["same-name", "unknown", "garbage", "dup"]),
                       max_size=4).map(tuple),
    handover=st.sampled_from(["complete", "partial", "missing", "damaged"]),
    boot=st.sampled_from(["same", "new-boot-id", "new-pid1", "counts", "none-readable"]),
    damaged_journal=st.booleans(),
    strangers_first=st.booleans(),
)


def problems(case: Case) -> list[str]:
    """What is wrong with recovery's decision for `case` (empty: nothing)."""
    core, journaled = build(case)
    facts = facts_of(case, journaled)
    frozen_at_start = core.phase is Phase.FROZEN
    out: Recovery = recover(core, facts)
    found: list[str] = []
    placed = {}
    for effect in out.effects:
        if isinstance(effect, Hold | HoldRenamed | Adopt | Spare | Close):
            if effect.index in placed:
                found.append(f"fd {effect.index} has two fates")
            placed[effect.index] = effect
    for fd in facts.stored:
        if fd.index not in placed:
            found.append(f"stored fd {fd.name} has no fate (leaked)")
    kept = {(facts.stored[e.index].name, facts.stored[e.index].file)
            for e in placed.values() if not isinstance(e, Close)}
    for effect in placed.values():
        fd = facts.stored[effect.index]
        if isinstance(effect, Close) and (fd.name, fd.file) not in kept:
            found.append(f"{fd.name} closed though no other opening of its file is kept")
    discarded = any(isinstance(e, DiscardHandover) for e in out.effects)
    if discarded and (frozen_at_start or (core.phase is not Phase.NORMAL and
                      core.phase is not Phase.PREPARED) or facts.journal_damaged):
        found.append(f"handover discarded in {core.phase.value}")
    rebuilt = {e.key for e in out.effects if isinstance(e, Rebuild)}
    stored_files = {(fd.name, fd.file) for fd in facts.stored}
    for session, token, ino in journaled:
        name, key = f"{session}/{token}", (session, token)
        acknowledged_copy = (name, (DEV, ino)) in stored_files
        if not acknowledged_copy:
            continue
        mine = [e for e in placed.values() if facts.stored[e.index].file == (DEV, ino)
                and facts.stored[e.index].name == name and not isinstance(e, Close)]
        if not mine:
            found.append(f"{name}: its stored file is not kept")
        elif isinstance(mine[0], HoldRenamed):
            found.append(f"{name}: the acknowledged file was quarantined")
        del key
    if core.phase is Phase.FROZEN and facts.handover is not None and \
            not facts.handover.damage:
        for session, token, ino in journaled:
            if (session, token) not in facts.handover.keys:
                continue  # neither stored nor handed over: never acknowledged
            if session not in core.sessions or token not in core.sessions[session].fds:
                found.append(f"{session}/{token}: in the handover, gone from its session")
                continue
            held = any(facts.stored[e.index].name == f"{session}/{token}"
                       and facts.stored[e.index].file == (DEV, ino)
                       for e in placed.values() if isinstance(e, Hold))
            if not held and (session, token) in facts.handover.keys and \
                    (session, token) not in rebuilt:
                found.append(f"{session}/{token}: frozen, not held, not rebuilt from the "
                             "handover that has it")
    return found


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_recovery_never_loses_or_swaps_an_acknowledged_fd(case: Case) -> None:
    assert problems(case) == []


def _discard_as_before(core: Orchestrator, facts: StartFacts, out: Recovery) -> None:
    """0.3.0's rule: a handover in FROZEN with no evidence of a new boot is discarded."""
    if facts.handover is not None and core.phase is Phase.FROZEN:
        out.effects.append(DiscardHandover("unfinished handover discarded"))


def _rebuild_nothing(core: Orchestrator, facts: StartFacts, held: object,
                     out: Recovery) -> None:
    """0.3.0's rule: fds missing from the store after a restart are lost."""
    missing = [(name, token) for name, s in core.sessions.items() for token, e in s.fds.items()
               if not e.problem and core.phase is not Phase.UPDATED]
    del held, facts
    out.records += core.fds_lost([k for k in missing])


@pytest.mark.parametrize("mutant", [
    ("_decide_handover", _discard_as_before),
    ("_account_missing", _rebuild_nothing),
])
def test_the_property_catches_a_recovery_that_discards_the_handover(
    monkeypatch: pytest.MonkeyPatch, mutant: tuple[str, Callable[..., None]]
) -> None:
    name, replacement = mutant
    monkeypatch.setattr(recovery_module, name, replacement)
    counterexample = find(cases, lambda case: bool(problems(case)),
                          settings=settings(max_examples=1000, deadline=None,
                                            database=None))
    assert counterexample.phase in ("frozen-after-reboot", "frozen")
