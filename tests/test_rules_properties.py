"""Property-based tests over a real daemon: random names, tokens, requires lists and call
orders from two uids (root and nobody), checked step by step against a model.

After every call: it failed exactly when the rules say it must, with one of the contract
errors that apply (named, never an internal error); and everything the daemon shows
(state, sessions, owners, fds, requires, sizes, its own open fds) equals the model. So
an error never changes anything, anywhere.
"""

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from liveupdated.client import BusError, Client, SessionClient
from liveupdated.core.errors import LiveUpdateError
from liveupdated.core.names import session_path
from liveupdated.privatebus import PrivateBus
from tests.conftest import closes_cycle, make_memfd
from tests.other_uid import OtherUid, content_digest, digest
from tests.rules_support import NOBODY, Host

MAX_SESSIONS = 4
MAX_FDS = 3
MAX_PER_UID = 2
MAX_BYTES = 20000
PER_UID_BYTES = MAX_BYTES // 4  # the daemon's default per-uid byte limit: a quarter
DAEMON_ARGS = (
    "--freeze-timeout", "0.05", "--max-sessions", str(MAX_SESSIONS),
    "--max-fds-per-session", str(MAX_FDS), "--max-sessions-per-uid", str(MAX_PER_UID),
    "--max-preserved-bytes", str(MAX_BYTES),
)
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
# A call on a session that does not exist finds no object: the bus library answers it.
NO_SESSION = frozenset({
    "NoSuchSession", "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownMethod",
})
UIDS = {"root": 0, "nobody": NOBODY}

# A non-admin's session names start with its uid ("65534-vm-b"); root names freely, so
# names of both kinds, for either actor, are tried (nobody's "vm-c" must be refused).
SESSION_NAMES = ["vm-a", "65534-vm-b", "65534-vm-c", "vm-c", "65534-vm-d", "vm-e"]
TOKENS = ["a", "b", "c", "d", "e"]
any_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=70)
names = st.one_of(st.sampled_from(SESSION_NAMES), st.sampled_from(SESSION_NAMES), any_text)
tokens = st.one_of(st.sampled_from(TOKENS), st.sampled_from(TOKENS), any_text)
actors = st.sampled_from(["root", "nobody"])


@dataclass(frozen=True)
class Step:
    actor: str
    op: str
    name: str = ""
    token: str = ""
    requires: tuple[str, ...] = ()
    size: int = 0
    enable: bool = False


def _step(op: str, **fields: Any) -> st.SearchStrategy[Step]:
    return st.builds(Step, actor=actors, op=st.just(op), **fields)


@st.composite
def valid_preserve(draw: st.DrawFn) -> Step:
    """A PreserveFd that the rules may well accept: known names, no self-requirement."""
    token = draw(st.sampled_from(TOKENS))
    others = [t for t in TOKENS if t != token]
    return Step(
        draw(actors), "preserve", name=draw(st.sampled_from(SESSION_NAMES[:3])), token=token,
        requires=tuple(draw(st.lists(st.sampled_from(others), max_size=2, unique=True))),
        size=draw(st.sampled_from([0, 100, 4096])),
    )


host_command = st.builds(
    Step, actor=st.just("root"), op=st.sampled_from(["prepare", "freeze", "freeze", "cancel"])
)
steps = st.one_of(
    _step("create", name=names),
    _step("create", name=st.sampled_from(SESSION_NAMES)),
    _step("preserve", name=names, token=tokens,
          requires=st.lists(tokens, max_size=3).map(tuple),
          size=st.sampled_from([0, 100, 4096, 9000])),
    valid_preserve(),
    valid_preserve(),
    _step("unpreserve", name=names, token=tokens),
    _step("unpreserve", name=st.sampled_from(SESSION_NAMES[:3]), token=st.sampled_from(TOKENS)),
    _step("retrieve", name=names, token=tokens),
    _step("close", name=names),
    _step("delay", name=names, enable=st.booleans()),
    _step("ready", name=names),
    _step("delay", name=st.sampled_from(SESSION_NAMES[:3]), enable=st.booleans()),
    _step("ready", name=st.sampled_from(SESSION_NAMES[:3])),
    _step("prepare"),
    _step("freeze"),
    _step("cancel"),
    host_command,
    host_command,
    _step("list"),
)
# A few sessions and fds first, so that later calls have something to act on.
setup = st.lists(
    st.one_of(
        _step("create", name=st.sampled_from(SESSION_NAMES)),
        valid_preserve(),
        valid_preserve(),
        _step("delay", name=st.sampled_from(SESSION_NAMES[:3]), enable=st.just(True)),
    ),
    max_size=12,
)
# Small scenarios the rules care about, among the single random calls.
update_attempt = st.tuples(
    st.lists(st.builds(Step, actor=actors, op=st.just("ready"),
                       name=st.sampled_from(SESSION_NAMES[:3])), max_size=3),
    st.sampled_from([[], [Step("root", "cancel")],
                     [Step("root", "cancel"), Step("root", "prepare")]]),
).map(lambda p: [Step("root", "prepare"), *p[0], Step("root", "freeze"), *p[1]])


@st.composite
def cycle_attempt(draw: st.DrawFn) -> list[Step]:
    """x requires y, then y requires x: the second must be refused."""
    x, y = draw(st.lists(st.sampled_from(TOKENS), min_size=2, max_size=2, unique=True))
    name, actor = draw(st.sampled_from(SESSION_NAMES[:3])), draw(actors)
    return [Step(actor, "preserve", name=name, token=x, requires=(y,)),
            Step(actor, "preserve", name=name, token=y, requires=(x,))]


PROLOGUE = [Step("root", "create", name="vm-a"), Step("nobody", "create", name="65534-vm-b")]
programs = st.tuples(
    setup,
    st.lists(
        st.one_of(steps.map(lambda step: [step]), steps.map(lambda step: [step]),
                  update_attempt, cycle_attempt()),
        min_size=1, max_size=15,
    ),
).map(lambda parts: PROLOGUE + parts[0] + [step for chunk in parts[1] for step in chunk])


def content(name: str, token: str, size: int) -> bytes:
    return f"{name}/{token}".encode()[:size]


# ---- the model -----------------------------------------------------------------------


@dataclass
class ModelSession:
    owner: str
    fds: dict[str, tuple[tuple[str, ...], int]] = field(default_factory=dict)
    delay: bool = False
    ready: bool = False

    @property
    def requires_of(self) -> dict[str, tuple[str, ...]]:
        return {token: requires for token, (requires, _) in self.fds.items()}


@dataclass
class Model:
    phase: str = "normal"
    sessions: dict[str, ModelSession] = field(default_factory=dict)

    def total_bytes(self, owner: str | None = None) -> int:
        """Bytes held by every session, or by the sessions of `owner`."""
        return sum(
            size for s in self.sessions.values() if owner in (None, s.owner)
            for _, size in s.fds.values()
        )

    def fd_count(self) -> int:
        return sum(len(s.fds) for s in self.sessions.values())

    def missing(self) -> list[str]:
        return [
            f"{n}/{r}" for n, s in self.sessions.items()
            for requires, _ in s.fds.values() for r in requires if r not in s.fds
        ]

    def laggards(self) -> list[str]:
        return [n for n, s in self.sessions.items() if s.delay and not s.ready]

    def session_errors(self, step: Step, phases: set[str]) -> tuple[set[str], ModelSession | None]:
        """Errors of a call on session `step.name`, and the session if it exists."""
        s = self.sessions.get(step.name)
        if s is None:
            return set(NO_SESSION), None
        errors = set()
        if step.actor not in ("root", s.owner):
            errors.add("AccessDenied")
        if self.phase not in phases:
            errors.add("WrongState")
        return errors, s

    def create_errors(self, step: Step) -> set[str]:
        errors: set[str] = set()
        if not NAME_RE.fullmatch(step.name):
            errors.add("InvalidArgument")
        if step.actor != "root" and not step.name.startswith(f"{UIDS[step.actor]}-"):
            errors.add("InvalidArgument")  # a non-admin's names start with its uid
        if self.phase != "normal":
            errors.add("WrongState")
        if step.name in self.sessions:
            errors.add("SessionExists")
        owned = sum(1 for s in self.sessions.values() if s.owner == step.actor)
        if len(self.sessions) >= MAX_SESSIONS or (
            step.actor != "root" and owned >= MAX_PER_UID
        ):
            errors.add("QuotaExceeded")
        return errors

    def expected_errors(self, step: Step) -> set[str]:
        """Every error the rules allow for `step` now; empty: it must succeed."""
        errors: set[str] = set()
        match step.op:
            case "create":
                errors |= self.create_errors(step)
            case "preserve":
                names = [step.token, *step.requires]
                if not all(NAME_RE.fullmatch(n) for n in names) or len(
                    set(step.requires)
                ) != len(step.requires):
                    errors.add("InvalidArgument")
                more, s = self.session_errors(step, {"normal"})
                errors |= more
                if s is not None:
                    if step.token in s.fds:
                        errors.add("TokenExists")
                    if len(s.fds) >= MAX_FDS or self.total_bytes() + step.size > MAX_BYTES:
                        errors.add("QuotaExceeded")
                    if s.owner != "root" and (
                        self.total_bytes(s.owner) + step.size > PER_UID_BYTES
                    ):
                        errors.add("QuotaExceeded")  # the owner's budget, whoever calls
                    if closes_cycle(s.requires_of, step.token, step.requires):
                        errors.add("InvalidArgument")
            case "unpreserve" | "retrieve":
                if not NAME_RE.fullmatch(step.token):
                    errors.add("InvalidArgument")
                more, s = self.session_errors(step, {"normal"})
                errors |= more
                if s is not None and step.token not in s.fds:
                    errors.add("NoSuchToken")
                if s is not None and step.op == "unpreserve" and any(
                    step.token in requires for requires, _ in s.fds.values()
                ):
                    errors.add("DependencyMissing")
            case "close" | "delay":
                errors |= self.session_errors(step, {"normal"})[0]
            case "ready":
                errors |= self.session_errors(step, {"prepared"})[0]
            case "prepare" | "freeze" | "cancel":
                if step.actor != "root":
                    errors.add("AccessDenied")
                allowed = {"prepare": {"normal"}, "freeze": {"prepared"},
                           "cancel": {"prepared", "frozen"}}[step.op]
                if self.phase not in allowed:
                    errors.add("WrongState")
                if step.op == "freeze" and self.phase == "prepared":
                    if self.missing():
                        errors.add("DependencyMissing")
                    if self.laggards():
                        errors.add("Timeout")
        return errors

    def apply(self, step: Step) -> None:
        """The effect of `step`, which succeeded."""
        match step.op:
            case "create":
                self.sessions[step.name] = ModelSession(step.actor)
            case "preserve":
                self.sessions[step.name].fds[step.token] = (step.requires, step.size)
            case "unpreserve":
                del self.sessions[step.name].fds[step.token]
            case "close":
                del self.sessions[step.name]
            case "delay":
                self.sessions[step.name].delay = step.enable
            case "ready":
                self.sessions[step.name].ready = True
            case "prepare" | "freeze" | "cancel":
                self.phase = {"prepare": "prepared", "freeze": "frozen",
                              "cancel": "normal"}[step.op]
                if step.op != "freeze":
                    for s in self.sessions.values():
                        s.ready = False

    def session_state(self, s: ModelSession) -> str:
        if self.phase == "prepared" and s.ready:
            return "ready"
        return {"normal": "open", "prepared": "prepared", "frozen": "frozen"}[self.phase]


# ---- the world: one daemon, root and nobody, for every example of a test --------------


@dataclass
class World:
    host: Host
    root: Client
    nobody: OtherUid
    baseline_fds: int

    def session(self, name: str) -> SessionClient:
        return SessionClient(self.root, name, session_path(name))

    async def reset(self) -> None:
        """Back to an empty NORMAL host, leaking nothing from the previous example."""
        if await self.root.state() in ("prepared", "frozen"):
            await self.root.cancel()
        for s in await self.root.list_sessions():
            await SessionClient(self.root, s.name, s.path).close()
        assert await self.host.open_fds(self.root) == self.baseline_fds

    async def call(self, step: Step) -> Any:
        if step.actor == "nobody":
            return await self._call_nobody(step)
        return await self._call_root(step)

    async def _call_root(self, step: Step) -> Any:
        match step.op:
            case "create":
                return (await self.root.create_session(step.name)).path
            case "preserve":
                fd = make_memfd(step.size, content(step.name, step.token, step.size))
                try:
                    await self.session(step.name).preserve_fd(step.token, fd, step.requires)
                finally:
                    os.close(fd)
                return None
            case "unpreserve":
                return await self.session(step.name).unpreserve_fd(step.token)
            case "retrieve":
                fd = await self.session(step.name).retrieve_fd(step.token)
                try:
                    return digest(fd)
                finally:
                    os.close(fd)
            case "close":
                return await self.session(step.name).close()
            case "delay":
                return await self.session(step.name).delay_freeze(step.enable)
            case "ready":
                return await self.session(step.name).ready_for_freeze()
            case "list":
                return [s.name for s in await self.root.list_sessions()]
        return await getattr(self.root, step.op)()

    async def _call_nobody(self, step: Step) -> Any:
        ops = {"create": "create_session", "preserve": "preserve_fd",
               "unpreserve": "unpreserve_fd", "retrieve": "retrieve_fd",
               "delay": "delay_freeze", "ready": "ready_for_freeze", "list": "list_sessions"}
        args: dict[str, Any] = {}
        if step.op == "create":
            args = {"name": step.name}
        elif step.op not in ("prepare", "freeze", "cancel", "list"):
            args = {"session": step.name}
        if step.op in ("preserve", "unpreserve", "retrieve"):
            args["token"] = step.token
        if step.op == "preserve":
            args |= {"requires": list(step.requires), "size": step.size,
                     "data": content(step.name, step.token, step.size).hex()}
        if step.op == "delay":
            args["enable"] = step.enable
        result = await self.nobody.call(ops.get(step.op, step.op), **args)
        if step.op == "list":
            return [row[0] for row in result]
        return result

    async def check(self, model: Model) -> None:
        """Everything the daemon shows equals the model."""
        assert await self.root.state() == model.phase
        listed = [(s.name, s.owner, s.state, s.fd_count) for s in await self.root.list_sessions()]
        assert listed == sorted(
            (n, UIDS[s.owner], model.session_state(s), len(s.fds))
            for n, s in model.sessions.items()
        )
        theirs = [row[0] for row in await self.nobody.call("list_sessions")]
        assert theirs == sorted(n for n, s in model.sessions.items() if s.owner == "nobody")
        for name, s in model.sessions.items():
            fds = [(f.token, tuple(f.requires), f.size) for f in
                   await self.session(name).list_fds()]
            assert fds == sorted((t, r, size) for t, (r, size) in s.fds.items()), name
        assert await self.host.open_fds(self.root) == self.baseline_fds + model.fd_count()


@pytest.fixture
async def world(bus: PrivateBus, tmp_path: Path) -> AsyncIterator[World]:
    with Host(bus, tmp_path) as host:
        await host.start(*DAEMON_ARGS)
        async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
            yield World(host, root, nobody, await host.open_fds(root))


def check_message(step: Step, error: str, message: str, model: Model) -> None:
    """Errors are named and say what was wrong."""
    assert message, f"{error} without a message for {step}"
    if error == "QuotaExceeded" and step.op == "preserve" and step.actor != "root":
        # a tenant hears of its own usage and limit only, never of the host's bytes
        assert re.search(rf"\bmaximum of {MAX_FDS} fds|uid {NOBODY} holds \d+ bytes; "
                         rf"{step.size} more would pass its limit of {PER_UID_BYTES} bytes|"
                         rf"host has no room for {step.size} more", message), message
        assert str(MAX_BYTES) not in message
    elif error == "QuotaExceeded":
        assert re.search(
            rf"\b({MAX_SESSIONS}|{MAX_FDS}|{MAX_PER_UID}|{MAX_BYTES}|{PER_UID_BYTES})\b", message
        )
    if error == "AccessDenied" and step.op not in ("prepare", "freeze", "cancel"):
        assert step.name in message
    if error == "DependencyMissing" and step.op == "freeze":
        for missing in model.missing():
            assert missing in message, f"{missing} not named in {message!r}"
    if error == "Timeout":
        for laggard in model.laggards():
            assert laggard in message, f"{laggard} not named in {message!r}"


def outcome(text: str) -> None:
    """Count outcomes for --hypothesis-show-statistics (outside hypothesis: nothing)."""
    if currently_in_test_context():
        event(text)


async def run_program(world: World, program: list[Step]) -> None:
    await world.reset()
    model = Model()
    for number, step in enumerate(program):
        expected = model.expected_errors(step)
        try:
            result = await world.call(step)
        except LiveUpdateError as exc:
            error, message = exc.name, str(exc)
        except BusError as exc:
            error, message = exc.name, exc.text
        else:
            outcome(f"{step.op}: ok")
            assert not expected, f"step {number} {step} succeeded; expected one of {expected}"
            if step.op == "retrieve":
                size = model.sessions[step.name].fds[step.token][1]
                assert result == content_digest(content(step.name, step.token, size), size)
            if step.op == "list":
                assert result == sorted(
                    n for n, s in model.sessions.items()
                    if step.actor in ("root", s.owner)
                )
            model.apply(step)
            await world.check(model)
            continue
        outcome(f"{step.op}: {error.rpartition('.')[2]}")
        assert error in expected, (
            f"step {number} {step} failed with {error}: {message}; expected "
            f"{expected or 'success'}"
        )
        check_message(step, error, message, model)
        await world.check(model)


def _s(actor: str, op: str, name: str = "", token: str = "", *requires: str,
       size: int = 0, enable: bool = False) -> Step:
    return Step(actor, op, name, token, requires, size, enable)


# Scenarios every run covers, before the random ones.
SCENARIOS = [
    # ReadyForFreeze belongs to one update attempt; the barrier times out naming vm-a.
    [*PROLOGUE, _s("root", "delay", "vm-a", enable=True), _s("root", "prepare"),
                _s("root", "ready", "vm-a"), _s("root", "cancel"), _s("root", "prepare"),
                _s("root", "freeze"), _s("root", "ready", "vm-a"), _s("root", "freeze")],
    # A cycle, the fds-per-session limit, a required token, then a clean update.
    [*PROLOGUE, _s("root", "preserve", "vm-a", "a", "b"), _s("root", "preserve", "vm-a", "b", "a"),
                _s("root", "preserve", "vm-a", "b"), _s("root", "preserve", "vm-a", "c"),
                _s("root", "preserve", "vm-a", "d"), _s("root", "unpreserve", "vm-a", "b"),
                _s("nobody", "retrieve", "vm-a", "a"), _s("root", "retrieve", "vm-a", "a"),
                _s("root", "prepare"), _s("root", "freeze"), _s("root", "cancel")],
    # A missing requirement in nobody's session fails Freeze, naming it.
    [*PROLOGUE, _s("nobody", "preserve", "65534-vm-b", "x", "y", size=4096),
                _s("root", "prepare"), _s("root", "freeze"),
                _s("nobody", "preserve", "65534-vm-b", "y"), _s("root", "cancel"),
                _s("nobody", "preserve", "65534-vm-b", "y"),
                _s("nobody", "retrieve", "65534-vm-b", "x"), _s("root", "prepare"),
                _s("nobody", "ready", "65534-vm-b"), _s("root", "freeze")],
    # Session names (nobody's start with its uid, root's are free), session limits (per
    # uid, total), the host's preserved-bytes limit and nobody's own byte limit.
    [*PROLOGUE, _s("nobody", "create", "vm-c"), _s("nobody", "create", "65534-vm-c"),
                _s("nobody", "create", "65534-vm-d"), _s("root", "create", "65534-vm-d"),
                _s("root", "create", "vm-e"),
                _s("root", "preserve", "vm-a", "a", size=9000),
                _s("root", "preserve", "vm-a", "b", size=9000),
                _s("nobody", "preserve", "65534-vm-b", "a", size=4096),
                _s("root", "unpreserve", "vm-a", "b"),
                _s("nobody", "preserve", "65534-vm-b", "a", size=4096),
                _s("nobody", "preserve", "65534-vm-c", "a", size=4096),
                _s("root", "preserve", "65534-vm-d", "a", size=9000),
                _s("nobody", "close", "65534-vm-d"), _s("root", "close", "65534-vm-d"),
                _s("nobody", "close", "65534-vm-c"), _s("nobody", "create", "65534-vm-c")],
]

SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def with_scenarios(test: Any) -> Any:
    for program in SCENARIOS:
        test = example(program=program)(test)
    return test


@settings(SETTINGS, max_examples=25)
@with_scenarios
@given(program=programs)
async def test_random_call_orders_keep_the_state_consistent_and_errors_named(
    world: World, program: list[Step]
) -> None:
    await run_program(world, program)


@pytest.mark.slow
@settings(SETTINGS, max_examples=400)
@with_scenarios
@given(program=programs)
async def test_random_call_orders_keep_the_state_consistent_long(
    world: World, program: list[Step]
) -> None:
    await run_program(world, program)
