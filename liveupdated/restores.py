"""Fds of the previous boot rebuilt in worker threads, ahead of RetrieveFd where allowed.

After the reboot every VMM asks for its fds at once, inside the blackout; rebuilding an
fd (copying its data back and checking it) is the slow part. Here it is done by a few
threads, one per core, in the order the fds were preserved, with an fd that is asked
for and not yet started moved to the front. A rebuilt fd is complete and checked
before it is kept here; it is nobody's until the service claims it for a caller (then
it is journaled, stored and handed out as before). Until then it is in no journal and
no fd store: a crash loses only work, never an fd, since the handover still has it.

An fd let go before it is claimed (Finish, Session.Finish, Close, DropSession) is
closed here, at once if it is rebuilt, else as soon as its thread is done; `settle`
waits for those threads, so that an update that ends holds no memfd of the old boot.
Everything but the rebuild runs on the event loop, so no lock is needed.
"""

import asyncio
import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from liveupdated.backends import Key
from liveupdated.core.orchestrator import FdEntry

WORKERS = min(4, os.cpu_count() or 1)
JOB_FDS = 8  # fds of the queue rebuilt in one job, if together under JOB_BYTES
JOB_BYTES = 16 << 20  # apparent size

Rebuild = Callable[[Key, FdEntry], int]


class Restores:
    def __init__(self, rebuild: Rebuild, workers: int = WORKERS) -> None:
        self._rebuild = rebuild
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._waits: dict[Key, asyncio.Future[None]] = {}  # queued or in flight
        self._urgent: dict[Key, FdEntry] = {}  # asked for: started first
        self._queue: dict[Key, FdEntry] = {}  # ahead of the requests, in order
        self._in_flight: set[asyncio.Future[None]] = set()  # waits of keys being rebuilt
        self._jobs: set[asyncio.Future[list[int | BaseException]]] = set()
        self._done: dict[Key, int] = {}  # rebuilt and checked, not yet claimed

    def ahead(self, entries: Iterable[tuple[Key, FdEntry]]) -> None:
        """Rebuild these, in this order, before anyone asks."""
        for key, entry in entries:
            if key not in self._waits and key not in self._done:
                self._waits[key] = self._new_wait()
                self._queue[key] = entry
        self._pump()

    def wanted(self, key: Key, entry: FdEntry) -> "asyncio.Future[None]":
        """Asked for now: done when `key` is rebuilt (then `claim` it) or let go (`claim`
        gives None); the backend's error if the rebuild failed (a later call tries
        again). Called in the same step as the check that allows it, so that a Finish
        decided after the check lets go of what this starts."""
        if key in self._done:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        wait = self._waits.get(key)
        if wait is None:
            wait = self._waits[key] = self._new_wait()
            self._urgent[key] = entry
        elif key in self._queue:
            self._urgent[key] = self._queue.pop(key)
        self._pump()
        return asyncio.shield(wait)

    def claim(self, key: Key) -> int | None:
        """The rebuilt fd of `key`, the caller's to keep or close from now on."""
        return self._done.pop(key, None)

    def drop(self, key: Key) -> None:
        """`key` is let go: its fd is closed, now or when its rebuild ends."""
        fd = self._done.pop(key, None)
        if fd is not None:
            os.close(fd)
        self._queue.pop(key, None)
        self._urgent.pop(key, None)
        wait = self._waits.pop(key, None)
        if wait is not None and wait not in self._in_flight and not wait.done():
            wait.set_result(None)

    async def settle(self) -> None:
        """Until no rebuild is under way (each one let go is closed by then)."""
        while self._jobs:
            await asyncio.wait(list(self._jobs))

    def close(self) -> None:
        for key in [*self._waits, *self._done]:
            self.drop(key)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _new_wait(self) -> asyncio.Future[None]:
        wait = asyncio.get_running_loop().create_future()
        wait.add_done_callback(_retrieved)
        return wait

    def _pump(self) -> None:
        """Start jobs while a worker is free: the fds asked for first, else the queue's,
        a few small ones a job (one thread hop and one wake-up of the loop for several).
        Fds asked for go in batches too: when many VMMs ask at once, faster than the
        workers rebuild, a job per fd cost each reply a thread hop (measured: a third of
        the throughput with 100 VMMs asking at once)."""
        while len(self._jobs) < self._workers and (self._urgent or self._queue):
            pending = self._urgent or self._queue
            batch: list[tuple[Key, FdEntry, asyncio.Future[None]]] = []
            size = 0
            while pending and (not batch or (len(batch) < JOB_FDS and size < JOB_BYTES)):
                key = next(iter(pending))
                entry = pending.pop(key)
                batch.append((key, entry, self._waits[key]))
                size += entry.size
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers, "liveupdated-restore")
            self._in_flight.update(wait for _, _, wait in batch)
            job = asyncio.get_running_loop().run_in_executor(
                self._executor, self._rebuild_all, [(k, e) for k, e, _ in batch])
            self._jobs.add(job)
            job.add_done_callback(functools.partial(self._ended, batch))

    def _rebuild_all(self, batch: list[tuple[Key, FdEntry]]) -> list[int | BaseException]:
        """In a worker thread: each fd rebuilt, or the error that stopped it."""
        outcomes: list[int | BaseException] = []
        for key, entry in batch:
            try:
                outcomes.append(self._rebuild(key, entry))
            except Exception as exc:  # handed to whoever waits for it
                outcomes.append(exc)
        return outcomes

    def _ended(self, batch: list[tuple[Key, FdEntry, asyncio.Future[None]]],
               job: asyncio.Future[list[int | BaseException]]) -> None:
        self._jobs.discard(job)
        if job.cancelled():
            outcomes: list[int | BaseException] = [
                OSError(f"the restore of {key[0]}/{key[1]} was stopped") for key, _, _ in batch]
        elif job.exception() is not None:
            outcomes = [job.exception()] * len(batch)  # type: ignore[list-item]
        else:
            outcomes = job.result()
        for (key, _, wait), outcome in zip(batch, outcomes, strict=True):
            self._in_flight.discard(wait)
            wanted = self._waits.get(key) is wait
            if wanted:
                del self._waits[key]
            if isinstance(outcome, BaseException):
                wait.set_exception(outcome)
                continue
            if wanted:
                self._done[key] = outcome
            else:
                os.close(outcome)
            wait.set_result(None)
        self._pump()


def _retrieved(wait: asyncio.Future[None]) -> None:
    """A rebuild nobody waits for may fail: asyncio is not to log that as unhandled."""
    if not wait.cancelled():
        wait.exception()
