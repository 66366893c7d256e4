"""The Restores on their own: any order of restores ahead, requests, claims, drops and
settles, with small fds (rebuilt on the event loop) and large ones (in worker threads),
and rebuilds that fail.

Each rebuild makes a real memfd holding its key. Properties: a request ends either with
the fd of its key, complete (or with the rebuild's error, or with nothing once let go);
no fd is ever leaked (every memfd made is claimed or closed by the end); small fds are
rebuilt on the loop's thread, a bounded few per turn of the loop, and large ones never
are, by the size the backend carried (a memfd preserved small may have grown since, and
one whose size the backend cannot tell yet counts as large); an fd asked for is rebuilt
before the rest of its lane.
"""

import asyncio
import itertools
import os
import threading
from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from liveupdated.backends import Key
from liveupdated.core.orchestrator import FdEntry
from liveupdated.restores import STEP, CarriedSize, Restores

SMALL, LARGE = 4096, 8 << 20  # a large one's rebuild takes a while: its copy is real
KEYS = [(f"vm{i % 3}", f"ram{i}") for i in range(12)]


def entry(i: int) -> FdEntry:
    """As the journal has it: the size at PreserveFd, small for every key."""
    return FdEntry(token=KEYS[i][1], kind="memfd", requires=(), size=SMALL, name="", seals=0)


def carried_size(key: Key) -> int | None:
    """As the backend carried it: every fourth key grew large after PreserveFd, and the
    backend cannot tell the size of every sixth yet."""
    i = KEYS.index(key)
    return None if i % 6 == 5 else LARGE if i % 4 == 3 else SMALL


def small(key: Key) -> bool:
    return carried_size(key) == SMALL


class Rebuilds:
    """A rebuild as a backend's: a new memfd holding its key; keys in `failing` fail."""

    def __init__(self, failing: set[Key], sizes: CarriedSize = carried_size) -> None:
        self.failing = failing
        self.carried_size = sizes
        self.made: dict[int, Key] = {}  # inode of every memfd made -> its key
        self.attempts: list[Key] = []  # in the order started
        self.threads: dict[Key, int] = {}
        self.lock = threading.Lock()

    def __call__(self, key: Key, entry: FdEntry) -> int:
        with self.lock:
            self.attempts.append(key)
            self.threads[key] = threading.get_ident()
        if key in self.failing:
            raise OSError(f"handover data of {key[0]}/{key[1]} cannot be read")
        fd = os.memfd_create(f"restore-test-{key[1]}", os.MFD_CLOEXEC)
        if self.carried_size(key) != SMALL:
            os.pwrite(fd, bytes(LARGE), 0)
        os.pwrite(fd, f"{key[0]}/{key[1]}".encode(), 0)
        with self.lock:
            self.made[os.fstat(fd).st_ino] = key
        return fd


def held_memfds(made: dict[int, Key]) -> set[int]:
    """Inodes of the memfds made by the test that this process still holds."""
    held = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:restore-test-"):
                inode = os.stat(f"/proc/self/fd/{name}").st_ino
                if inode in made:
                    held.add(inode)
        except OSError:
            continue
    return held


@dataclass
class Request:
    i: int
    wait: "asyncio.Future[None]"
    dropped: bool = False  # its key was let go after it was made


ops = st.lists(
    st.one_of(
        st.tuples(st.just("ahead"), st.lists(st.integers(0, 11), max_size=12)),
        st.tuples(st.just("want"), st.integers(0, 11)),
        st.tuples(st.just("drop"), st.integers(0, 11)),
        st.tuples(st.just("settle"), st.sampled_from([None, "vm0", "vm1", "vm2"])),
        st.tuples(st.just("turn"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, failing=st.sets(st.integers(0, 11), max_size=3))
@example(ops=[("want", 3), ("drop", 3), ("settle", "vm0")], failing=set())  # in a thread
def test_every_request_ends_with_its_fd_or_its_error_and_no_fd_leaks(
    ops: list[tuple[str, object]], failing: set[int]
) -> None:
    asyncio.run(run(ops, failing))


async def run(ops: list[tuple[str, object]], failing: set[int]) -> None:
    check = Checks(Rebuilds({KEYS[i] for i in failing}), failing)
    errors: list[dict[str, object]] = []  # what a callback raised: none may
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    try:
        for op, arg in ops:
            await check.do(op, arg)
            for request in [r for r in check.requests if r.wait.done()]:
                check.requests.remove(request)
                await check.end(request)
        for request in check.requests:
            await check.end(request)
        await check.restores.settle()
    finally:
        check.restores.close()
        await check.restores.settle()
    check.at_the_end()
    assert errors == []


class Checks:
    def __init__(self, rebuilds: Rebuilds, failing: set[int]) -> None:
        self.rebuilds = rebuilds
        self.restores = Restores(rebuilds, carried_size, workers=2)
        self.failing = failing
        self.loop_thread = threading.get_ident()
        self.requests: list[Request] = []
        self.asked: set[int] = set()
        self.claimed: dict[int, int] = {}  # key index -> its fd, the test's now

    async def do(self, op: str, arg: object) -> None:
        if op == "ahead":
            assert isinstance(arg, list)
            self.restores.ahead((KEYS[i], entry(i)) for i in arg if i not in self.claimed)
        elif op == "want" and arg not in self.claimed:
            assert isinstance(arg, int)
            await self.want(arg)
        elif op == "drop":
            assert isinstance(arg, int)
            self.restores.drop(KEYS[arg])
            for request in self.requests:
                request.dropped |= request.i == arg
            self.asked.discard(arg)
        elif op == "settle":
            assert arg is None or isinstance(arg, str)
            await self.restores.settle(arg)
            await asyncio.sleep(0)  # one turn: a request (a shield) follows its wait's end
            # Whatever of that session (or of all) was let go is closed by now.
            for request in self.requests:
                if request.dropped and arg in (None, KEYS[request.i][0]):
                    assert request.wait.done(), f"{KEYS[request.i]} still being rebuilt"
        else:
            await asyncio.sleep(0)

    async def want(self, i: int) -> None:
        """Ask; a small fd asked for goes before every small one not asked for."""
        started = len(self.rebuilds.attempts)
        new = KEYS[i] not in self.rebuilds.attempts and small(KEYS[i])
        self.asked.add(i)
        self.requests.append(Request(i, self.restores.wanted(KEYS[i], entry(i))))
        await asyncio.sleep(0)
        for key in self.rebuilds.attempts[started:] if new else []:
            if key == KEYS[i]:
                break
            if small(key):
                assert KEYS.index(key) in self.asked, f"{key} went before {KEYS[i]}"

    async def end(self, request: Request) -> None:
        """Its fd (checked), its error, or nothing if let go or claimed already."""
        try:
            await request.wait
        except OSError as exc:
            assert request.i in self.failing and KEYS[request.i][1] in str(exc)
            return
        if request.dropped:
            return  # its key may be asked for again: the fd is that request's
        fd = self.restores.claim(KEYS[request.i])
        if fd is None:
            assert request.i in self.claimed, f"{KEYS[request.i]} was rebuilt and then lost"
            return
        assert request.i not in self.claimed, f"{KEYS[request.i]} rebuilt twice"
        name = "/".join(KEYS[request.i]).encode()
        assert os.pread(fd, len(name), 0) == name
        self.claimed[request.i] = fd

    def at_the_end(self) -> None:
        """Small fds rebuilt on the loop, large ones never; nothing held but the claimed."""
        for key, thread in self.rebuilds.threads.items():
            assert (thread == self.loop_thread) == small(key), f"{key} rebuilt on the wrong thread"
        held = held_memfds(self.rebuilds.made)
        assert held <= {os.fstat(fd).st_ino for fd in self.claimed.values()}, \
            "a memfd was leaked"
        for fd in self.claimed.values():
            os.close(fd)


async def test_small_fds_are_rebuilt_a_few_a_turn_of_the_loop() -> None:
    """Between two steps the loop serves whatever else is ready: 100 small fds ahead
    never hold it for more than a step's worth."""
    rebuilds = Rebuilds(set(), lambda key: SMALL)
    restores = Restores(rebuilds, rebuilds.carried_size)
    keys = [(f"vm{i}", "ram") for i in range(100)]
    restores.ahead((key, entry(0)) for key in keys)
    seen = [len(rebuilds.attempts)]
    while seen[-1] < len(keys):
        await asyncio.sleep(0)
        seen.append(len(rebuilds.attempts))
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(steps) <= STEP[0] and len(steps) >= len(keys) // STEP[0], steps
    for key in keys:
        fd = restores.claim(key)
        assert fd is not None and os.pread(fd, 64, 0) == "/".join(key).encode()
        os.close(fd)
    restores.close()
