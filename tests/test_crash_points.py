"""A kill -9 at every durable write point of a whole update loses no acknowledged fd.

Enumerated, not sampled: a clean run counts the crash points (`liveupdated.durable.point`)
that each daemon of the update passes, P1 in the old boot's daemon (sessions, PreserveFd,
PreserveFds, UnpreserveFd, Close, Prepare, Freeze, Reboot) and P2 in the new boot's
(RetrieveSession, RetrieveFd, Session.Finish, Finish, stop). Then, for every N in 1..P1 and
in 1..P2, the run is repeated with LIVEUPDATED_CRASH_AT_POINT=N in that daemon, which dies
by SIGKILL at its Nth point; the workload stops at the first call that gets no answer; a
daemon without the hook restarts on the same state dir and fd store, and the client checks
what it was told against what the restarted daemon has:

- every fd acknowledged (and not released since) is there, byte-exact;
- nothing acknowledged as released (UnpreserveFd, Close, Session.Finish, Finish) is back;
- nothing refused (an error reply of the contract) appears.

A call that got no answer may have happened or not: either outcome is accepted, but what
is there of it must be what was sent.
"""

import contextlib
import copy
import itertools
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from liveupdated import durable
from liveupdated.client import BusError, Client, SessionClient
from liveupdated.core.errors import LiveUpdateError
from liveupdated.core.names import session_path
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess, Notifications
from tests.conftest import make_memfd

Key = tuple[str, str]

# The kinds of point the clean run must pass, with the daemon (phase) that passes them:
# a point that disappears from the code (or from the path of an update) fails the test.
EXPECTED_PHASE_1 = {
    "append write",  # journal records: sessions, fds, phases
    "append fdatasync",
    "fd store message",  # FDSTORE=1 of each preserved fd, FDSTOREREMOVE=1, STATUS=
    "handover file create",  # Reboot: the simulated kexec's copy of each memfd
    "handover data write",
    "handover record write",
    "handover record fsync",
    "handover record rename",
    "directory fsync",
}
EXPECTED_PHASE_2 = {
    "append write",  # Rebooted, FdRestored, SessionFinished, the phase changes
    "append fdatasync",
    "fd store message",  # restored fds stored, then removed at Finish
    "atomic write",  # Finish compacts the journal
    "atomic fsync",
    "atomic rename",
    "directory fsync",
}

BUS_ERRORS = (BusError, ConnectionError, EOFError)  # the daemon died: no answer
REPLAYS = 5  # runs of a case whose points came in another order than the clean run's


def content(tag: str, size: int) -> bytes:
    """Distinct bytes for each fd: a lost, swapped or torn copy cannot compare equal."""
    unit = f"<{tag}>".encode()
    return (unit * (size // len(unit) + 1))[:size]


# What phase 1 preserves: (session, token) -> (size, requires); all of a size that keeps
# 2 * (P1 + P2) daemon runs quick, yet more than one piece of the handover copy.
FDS: dict[Key, tuple[int, list[str]]] = {
    ("vm-a", "ram"): (96 << 10, []),
    ("vm-a", "rom"): (4096, ["ram"]),
    ("vm-a", "bad"): (4096, ["bad"]),  # refused: a cycle
    ("vm-b", "ram"): (64 << 10, []),
    ("vm-b", "disk"): (12345, ["ram"]),
    ("vm-b", "nvram"): (4096, []),  # unpreserved
    ("vm-b", "good2"): (4096, []),  # with bad2 in one PreserveFds: refused, all of it
    ("vm-b", "bad2"): (4096, ["bad2"]),
    ("scratch", "tmp"): (8192, []),  # its session is closed
}
EXPECTED = {key: content("/".join(key), size) for key, (size, _) in FDS.items()}


@dataclass
class Ledger:
    """What the client was told, call by call."""

    acked: set[Key] = field(default_factory=set)  # preserved, acknowledged
    released: set[Key] = field(default_factory=set)  # acknowledged as let go
    refused: set[Key] = field(default_factory=set)  # an error reply of the contract
    unanswered: set[Key] = field(default_factory=set)  # the daemon died during the call
    releasing: set[Key] = field(default_factory=set)  # died during their release: either
    sessions: set[str] = field(default_factory=set)  # created, acknowledged
    closed: set[str] = field(default_factory=set)  # closed/finished, acknowledged
    finish: str = ""  # Manager.Finish: "", "acked", "refused", "lost"
    calls: list[str] = field(default_factory=list)
    dead: bool = False  # a call got no answer: the workload stops
    rebooted: bool = False  # Reboot acknowledged: the daemon exits by itself
    progress: list[tuple[str, int]] = field(default_factory=list)  # call, points passed

    def held(self) -> set[Key]:
        """What must be there: acknowledged, and no release of it even attempted."""
        return self.acked - self.released - self.releasing

    def released_by(self, outcome: str, keys: Iterable[Key]) -> None:
        keys = set(keys) & self.acked
        if outcome == "acked":
            self.released |= keys
        elif outcome in ("lost", "unknown"):
            self.releasing |= keys


class Run:
    """One case: a state dir, an fd store and the daemons that use them in turn."""

    def __init__(self, bus: PrivateBus, root: Path, log: IO[bytes]) -> None:
        self.bus = bus
        self.root = root
        self.state = root / "state"
        self.store = Notifications()
        self.log = log
        self.daemons: list[DaemonProcess] = []

    def daemon(self, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(self.bus.address, self.state, "--backend", "simulated",
                               log=self.log, env=env, notifications=self.store)
        self.daemons.append(daemon)
        return daemon

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.kill()
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)


def points_in(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def hook_env(log: Path, crash_at: int | None) -> dict[str, str]:
    env = {durable.POINTS_LOG_ENV: str(log)}
    if crash_at is not None:
        env[durable.CRASH_AT_POINT_ENV] = str(crash_at)
    return env


async def attempt(
    ledger: Ledger, label: str, call: Callable[..., Awaitable[Any]], *args: Any
) -> tuple[str, Any]:
    """("acked", result), ("refused", error), ("lost", error) or ("unknown", error);
    ("skipped", None), the call not made, once a call got no answer."""
    if ledger.dead:
        return "skipped", None
    try:
        result = await call(*args)
    except LiveUpdateError as exc:
        ledger.calls.append(f"{label}: refused ({exc.name})")
        return "refused", exc
    except BUS_ERRORS as exc:
        ledger.calls.append(f"{label}: no answer ({exc})")
        ledger.dead = True
        return "lost", exc
    except Exception as exc:  # neither a reply nor the daemon's death: unknown
        ledger.calls.append(f"{label}: unknown ({exc!r})")
        ledger.dead = True
        return "unknown", exc
    ledger.calls.append(f"{label}: acked")
    return "acked", result


def record(ledger: Ledger, outcome: str, keys: list[Key]) -> None:
    """The outcome of a call that preserves `keys` (all or none)."""
    target = {"acked": ledger.acked, "refused": ledger.refused}.get(outcome)
    if target is not None:
        target.update(keys)
    elif outcome in ("lost", "unknown"):
        ledger.unanswered.update(keys)


def new_memfd(key: Key) -> int:
    data = EXPECTED[key]
    return make_memfd(len(data), data, name="-".join(key))


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size + 1, 0)


async def wait_name_released(client: Client) -> None:
    """Until the bus has let go of the dead daemon's name (bus replies, no sleeping)."""
    for _ in range(10000):
        (has,) = await client.call("/org/freedesktop/DBus", "org.freedesktop.DBus",
                                   "NameHasOwner", "s", ["org.liveupdate1"],
                                   destination="org.freedesktop.DBus")
        if not has:
            return
    raise AssertionError("the bus still names a daemon that died")


# ---- the workload ------------------------------------------------------------------------


async def phase_1(vmm: Client, ledger: Ledger, points_log: Path) -> None:
    """The old boot, up to Reboot's reply."""
    fds: dict[Key, int] = {key: new_memfd(key) for key in FDS}
    try:
        await _phase_1(vmm, ledger, points_log, fds)
    finally:
        for fd in fds.values():
            os.close(fd)


async def _phase_1(vmm: Client, ledger: Ledger, points_log: Path, fds: dict[Key, int]) -> None:
    def mark(label: str) -> None:
        ledger.progress.append((label, len(points_in(points_log))))

    sessions: dict[str, SessionClient] = {}
    for name in ("vm-a", "vm-b", "scratch"):
        outcome, session = await attempt(ledger, f"CreateSession({name})",
                                         vmm.create_session, name)
        if outcome == "acked":
            ledger.sessions.add(name)
            sessions[name] = session
        mark(f"CreateSession({name})")
        if name == "vm-a" and outcome == "acked":
            for token in ("ram", "rom", "bad"):
                key = ("vm-a", token)
                outcome, _ = await attempt(
                    ledger, f"PreserveFd(vm-a/{token})",
                    session.preserve_fd, token, fds[key], FDS[key][1])
                record(ledger, outcome, [key])
                mark(f"PreserveFd(vm-a/{token})")
        if name == "vm-b" and outcome == "acked":
            for tokens in (["ram", "disk", "nvram"], ["good2", "bad2"]):
                keys = [("vm-b", t) for t in tokens]
                outcome, _ = await attempt(
                    ledger, f"PreserveFds(vm-b/{'+'.join(tokens)})",
                    session.preserve_fds, [(k[1], fds[k], FDS[k][1]) for k in keys])
                record(ledger, outcome, keys)
                mark(f"PreserveFds({tokens})")
            outcome, _ = await attempt(ledger, "UnpreserveFd(vm-b/nvram)",
                                       session.unpreserve_fd, "nvram")
            ledger.released_by(outcome, [("vm-b", "nvram")])
            mark("UnpreserveFd")
        if name == "scratch" and outcome == "acked":
            key = ("scratch", "tmp")
            outcome, _ = await attempt(ledger, "PreserveFd(scratch/tmp)",
                                       session.preserve_fd, "tmp", fds[key])
            record(ledger, outcome, [key])
            mark("PreserveFd(scratch/tmp)")
            outcome, _ = await attempt(ledger, "Close(scratch)", session.close)
            if outcome == "acked":
                ledger.closed.add("scratch")
            ledger.released_by(outcome, [k for k in FDS if k[0] == "scratch"])
            mark("Close(scratch)")
    for step in ("prepare", "freeze", "reboot"):
        outcome, _ = await attempt(ledger, step, getattr(vmm, step))
        mark(step)
    ledger.rebooted = outcome == "acked"


async def phase_2(vmm: Client, ledger: Ledger, found: list[str]) -> None:
    """The new boot: what phase 1 left (all of `ledger.held()`) is taken back and let go.
    Wrong content handed out here is a violation in itself (into `found`)."""
    sessions: dict[str, SessionClient] = {}
    for name, tokens in (("vm-a", ["ram"]), ("vm-b", ["ram"])):
        outcome, session = await attempt(ledger, f"RetrieveSession({name})",
                                         vmm.retrieve_session, name)
        if outcome != "acked":
            continue
        sessions[name] = session
        for token in tokens:
            outcome, fd = await attempt(ledger, f"RetrieveFd({name}/{token})",
                                        session.retrieve_fd, token)
            if outcome == "acked":
                if read_all(fd) != EXPECTED[(name, token)]:
                    found.append(f"RetrieveFd({name}/{token}) in phase 2 handed out "
                                 "other bytes than were preserved")
                os.close(fd)
    if "vm-a" in sessions:  # vm-a/rom, never retrieved, goes with it
        outcome, _ = await attempt(ledger, "Session.Finish(vm-a)", sessions["vm-a"].finish)
        if outcome == "acked":
            ledger.closed.add("vm-a")
        ledger.released_by(outcome, [k for k in ledger.acked if k[0] == "vm-a"])
    outcome, _ = await attempt(ledger, "Finish", vmm.finish)
    ledger.finish = outcome
    if outcome == "acked":
        ledger.closed.update(ledger.sessions)
    ledger.released_by(outcome, ledger.acked)


# ---- the check ---------------------------------------------------------------------------


async def retrieved_equal(session: SessionClient, key: Key, found: list[str],
                          must: bool) -> bool:
    """RetrieveFd `key` and compare it byte for byte; a failure is a violation if `must`."""
    try:
        fd = await session.retrieve_fd(key[1])
    except LiveUpdateError as exc:
        if must:
            found.append(f"{key[0]}/{key[1]} acknowledged but RetrieveFd fails: {exc.name}: "
                         f"{exc}")
        return False
    try:
        if read_all(fd) != EXPECTED[key]:
            found.append(f"{key[0]}/{key[1]} comes back with other bytes "
                         f"({os.fstat(fd).st_size} bytes, {len(EXPECTED[key])} preserved)")
    finally:
        os.close(fd)
    return True


async def listed(vmm: Client, names: list[str]) -> dict[str, set[str]]:
    """Tokens of each of `names` the daemon lists (sessions it has)."""
    have = {s.name for s in await vmm.list_sessions()}
    tokens: dict[str, set[str]] = {}
    for name in names:
        if name in have:
            rows = await SessionClient(vmm, name, session_path(name)).list_fds()
            tokens[name] = {row.token for row in rows}
    return tokens


def compare_lists(ledger: Ledger, tokens: dict[str, set[str]], found: list[str]) -> None:
    for key in sorted(ledger.held()):
        if key[1] not in tokens.get(key[0], set()):
            found.append(f"{key[0]}/{key[1]} acknowledged but not listed after the restart")
    for name in sorted(ledger.closed & set(tokens)):
        found.append(f"session {name} acknowledged as closed/finished is back")
    for name, present in sorted(tokens.items()):
        for token in sorted(present):
            key = (name, token)
            if key in ledger.released:
                found.append(f"{name}/{token} acknowledged as released is back")
            elif key in ledger.refused and key not in ledger.unanswered:
                found.append(f"{name}/{token} was refused, yet is there")
            elif key not in ledger.acked | ledger.unanswered:
                found.append(f"{name}/{token} was never preserved, yet is there")


async def check_after_phase_1_crash(vmm: Client, ledger: Ledger) -> list[str]:
    """The invariant, against the daemon restarted after a crash in phase 1 (same client
    connection: before Prepare a VMM's sessions go with it)."""
    found: list[str] = []
    state = await vmm.state()
    names = sorted({k[0] for k in FDS})
    if state == "updated":
        for name in names:
            with contextlib.suppress(LiveUpdateError):
                await vmm.retrieve_session(name)
    elif state not in ("normal", "prepared", "frozen"):
        return [f"the restarted daemon is in state {state!r}"]
    tokens = await listed(vmm, names)
    compare_lists(ledger, tokens, found)
    if state in ("prepared", "frozen"):
        try:
            await vmm.cancel()
        except LiveUpdateError as exc:
            return [*found, f"Cancel in {state} after the restart fails: {exc.name}: {exc}"]
    for key in sorted(ledger.acked | ledger.unanswered):
        if key[0] in tokens and key[1] in tokens[key[0]]:
            session = SessionClient(vmm, key[0], session_path(key[0]))
            await retrieved_equal(session, key, found, must=key in ledger.held())
    return [f"[restarted in {state}] {f}" for f in found]


async def check_after_phase_2_crash(
    vmm: Client, ledger: Ledger, store: Notifications
) -> list[str]:
    found: list[str] = []
    state = await vmm.state()
    if state == "normal":
        if ledger.finish not in ("acked", "lost", "unknown"):
            found.append("state normal after the restart, but no Finish was acknowledged: "
                         f"{sorted(ledger.held())} gone")
        if sessions := await vmm.list_sessions():
            found.append(f"normal, yet sessions remain: {[s.name for s in sessions]}")
        if store.store:
            found.append(f"normal, yet the fd store holds {sorted(store.store)}")
        return [f"[restarted in normal] {f}" for f in found]
    if state != "updated":
        return [f"the restarted daemon is in state {state!r}"]
    if ledger.finish == "acked":
        found.append("Finish was acknowledged, yet the state is updated again")
    for name in sorted({k[0] for k in ledger.acked}):
        try:
            session = await vmm.retrieve_session(name)
        except LiveUpdateError as exc:
            if any(k[0] == name for k in ledger.held()):
                found.append(f"RetrieveSession({name}) fails: {exc.name}: {exc}")
            continue
        for key in sorted(k for k in ledger.acked if k[0] == name):
            back = await retrieved_equal(session, key, found, must=key in ledger.held())
            if back and key in ledger.released:
                found.append(f"{key[0]}/{key[1]} acknowledged as released is back")
    return [f"[restarted in updated] {f}" for f in found]


# ---- one case ----------------------------------------------------------------------------


@dataclass
class Outcome:
    points: list[str]  # the points the hooked daemon passed, the fatal one last
    status: int | None  # its exit status (None: it never started)
    ledger: Ledger
    violations: list[str]


class Cases:
    def __init__(self, bus: PrivateBus, tmp: Path) -> None:
        self.bus = bus
        self.tmp = tmp
        self.daemon_log_path = tmp / "daemons.log"
        self.daemon_log = self.daemon_log_path.open("ab")
        self.count = itertools.count()

    def close(self) -> None:
        self.daemon_log.close()

    @contextlib.contextmanager
    def run(self) -> Iterator[Run]:
        root = Path(tempfile.mkdtemp(prefix="case-", dir=self.tmp))
        run = Run(self.bus, root, self.daemon_log)
        try:
            yield run
        finally:
            run.close()

    def tail(self, lines: int = 40) -> str:
        self.daemon_log.flush()
        text = self.daemon_log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def phase_1_case(self, crash_at: int | None, sabotage: Key | None = None) -> Outcome:
        """Phase 1 with the hook; restarted without it and checked (unless clean)."""
        with self.run() as run:
            log = run.root / "points-1"
            ledger = Ledger()
            async with await Client.connect(self.bus.address) as vmm:
                first = run.daemon(hook_env(log, crash_at))
                try:
                    first.start()
                except RuntimeError as exc:  # killed before READY=1
                    ledger.calls.append(f"start: {exc}")
                else:
                    await phase_1(vmm, ledger, log)
                if not (ledger.dead or ledger.rebooted):  # a refusal: it would not exit
                    first.kill()
                status = first.wait() if first.process is not None else None
                if crash_at is None:
                    return Outcome(points_in(log), status, ledger, [])
                await wait_name_released(vmm)
                run.store.settle()
                if sabotage is not None:  # the self-test: the store loses an fd
                    name = "/".join(sabotage)
                    assert name in run.store.store, (name, sorted(run.store.store))
                    os.close(run.store.store.pop(name))
                run.daemon().start()
                violations = await check_after_phase_1_crash(vmm, ledger)
            return Outcome(points_in(log), status, ledger, violations)

    async def phase_2_case(self, crash_at: int | None) -> tuple[Outcome, Outcome]:
        """Phase 1 clean, then phase 2 with the hook; restarted without it and checked."""
        with self.run() as run:
            log1, log2 = run.root / "points-1", run.root / "points-2"
            ledger = Ledger()
            async with await Client.connect(self.bus.address) as vmm:
                old = run.daemon(hook_env(log1, None)).start()
                await phase_1(vmm, ledger, log1)
                assert not ledger.dead, ledger.calls
                assert old.wait() == 0
            first = Outcome(points_in(log1), 0, copy.deepcopy(ledger), [])
            ledger.calls, ledger.progress = [], []
            run.store.settle()
            found: list[str] = []
            async with await Client.connect(self.bus.address) as vmm:
                new = run.daemon(hook_env(log2, crash_at))
                try:
                    new.start()
                except RuntimeError as exc:
                    ledger.calls.append(f"start: {exc}")
                else:
                    await phase_2(vmm, ledger, found)
                    if new.process is not None and new.process.poll() is None:
                        new.stop()  # the stop passes points too
                status = new.wait() if new.process is not None else None
                if crash_at is not None:
                    await wait_name_released(vmm)
                    run.store.settle()
                    run.daemon().start()
                    found += await check_after_phase_2_crash(vmm, ledger, run.store)
            return first, Outcome(points_in(log2), status, ledger, found)


def describe(phase: int, n: int, clean: list[str], outcome: Outcome, tail: str) -> str:
    at = clean[n - 1] if n <= len(clean) else "(past the clean run's last point)"
    died = outcome.points[-1] if outcome.points else "(none)"
    return (
        f"phase {phase}, N={n}: point {at!r} of the clean run (this run died at "
        f"{died!r}, its point {len(outcome.points)}, exit {outcome.status})\n"
        + "".join(f"    violation: {v}\n" for v in outcome.violations)
        + "".join(f"    call: {c}\n" for c in outcome.ledger.calls)
        + "    daemon log tail:\n" + "\n".join(f"      {line}" for line in tail.splitlines())
    )


@pytest.fixture
def cases(bus: PrivateBus, tmp_path: Path) -> Iterator[Cases]:
    c = Cases(bus, tmp_path)
    yield c
    c.close()


# ---- the tests ---------------------------------------------------------------------------


async def test_clean_run_passes_every_kind_of_point(cases: Cases) -> None:
    first, second = await cases.phase_2_case(None)
    assert first.status == 0 and not first.ledger.dead, first.ledger.calls
    assert second.status == 0 and not second.ledger.dead, second.ledger.calls
    assert second.ledger.finish == "acked"
    assert not second.violations, second.violations
    assert set(first.points) >= EXPECTED_PHASE_1, EXPECTED_PHASE_1 - set(first.points)
    assert set(second.points) >= EXPECTED_PHASE_2, EXPECTED_PHASE_2 - set(second.points)
    # The workload did what it says: these were refused, these acknowledged.
    assert first.ledger.refused == {("vm-a", "bad"), ("vm-b", "good2"), ("vm-b", "bad2")}
    assert first.ledger.held() == {("vm-a", "ram"), ("vm-a", "rom"), ("vm-b", "ram"),
                                   ("vm-b", "disk")}
    assert first.ledger.closed == {"scratch"}


async def test_the_check_detects_a_lost_fd(cases: Cases) -> None:
    """The self-test: the store loses vm-a/ram before the restart; the check says so."""
    clean = await cases.phase_1_case(None)
    after = dict(clean.ledger.progress)["PreserveFds(['good2', 'bad2'])"]
    outcome = await cases.phase_1_case(after + 1, sabotage=("vm-a", "ram"))
    assert ("vm-a", "ram") in outcome.ledger.held()
    assert any("vm-a/ram acknowledged but" in v for v in outcome.violations), (
        outcome.violations)
    # and without the sabotage, the same crash is clean
    assert not (await cases.phase_1_case(after + 1)).violations


async def crash_at_every_point(
    phase: int, clean: list[str], case: Callable[[int], Awaitable[Outcome]], cases: Cases
) -> list[str]:
    """Run `case(n)` for every n in 1..len(clean): the violations of each, described.

    The daemon's STATUS= messages are rate-limited by a timer, so one of them may come a
    point earlier or later than in the clean run: a case whose points differ from the
    clean run's first n is run again, so that every point of the clean run is the fatal
    one of some run; one that never matches is itself a failure (a point left untested).
    """
    failures = []
    for n in range(1, len(clean) + 1):
        for _ in range(REPLAYS):
            outcome = await case(n)
            if outcome.status != -9:
                outcome.violations.append(
                    f"the hook did not kill the daemon (exit {outcome.status})")
            if outcome.violations:
                failures.append(describe(phase, n, clean, outcome, cases.tail()))
                break
            if outcome.points == clean[:n]:
                break
        else:
            outcome.violations.append(
                f"in {REPLAYS} runs the daemon never passed the clean run's first {n} "
                f"points: point {n} ({clean[n - 1]!r}) is untested")
            failures.append(describe(phase, n, clean, outcome, cases.tail()))
    return failures


async def test_a_crash_at_every_point_of_the_old_boot_loses_nothing(cases: Cases) -> None:
    clean = await cases.phase_1_case(None)
    assert clean.status == 0 and not clean.ledger.dead, clean.ledger.calls
    failures = await crash_at_every_point(1, clean.points, cases.phase_1_case, cases)
    assert not failures, f"{len(failures)} of {len(clean.points)} crash points:\n" + "\n".join(
        failures)


async def test_a_crash_at_every_point_of_the_new_boot_loses_nothing(cases: Cases) -> None:
    _, clean = await cases.phase_2_case(None)
    assert clean.status == 0 and not clean.ledger.dead, clean.ledger.calls

    async def case(n: int) -> Outcome:
        return (await cases.phase_2_case(n))[1]

    failures = await crash_at_every_point(2, clean.points, case, cases)
    assert not failures, f"{len(failures)} of {len(clean.points)} crash points:\n" + "\n".join(
        failures)
