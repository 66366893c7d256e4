"""Fds of the previous boot rebuilt ahead of RetrieveFd where allowed.

After the reboot every VMM asks for its fds at once, inside the blackout; rebuilding an
fd (copying its data back and checking it) is the slow part. Fds are rebuilt in the
order they were preserved, with an fd that is asked for and not yet started moved to
the front. A rebuilt fd is complete and checked before it is kept here; it is nobody's
until the service claims it for a caller (then it is journaled, stored and handed out as
before). Until then it is in no journal and no fd store: a crash loses only work, never
an fd, since the handover still has it.

Two lanes. A small fd (at most INLINE_BYTES, as the backend carried it: a memfd may have
grown since PreserveFd) is rebuilt on the event loop itself, a few a step, one step per
turn of the loop, so requests are served between steps. Large ones, and those whose size
the backend cannot tell yet, go to worker threads, one per core, which copy while the
GIL is free. Small fds in threads were measured to cost twice the CPU per fd handed back
(10,000 fds to 100 VMMs at once): each rebuild is a dozen short system calls, and every
one of them passed the GIL between the workers and the loop.

An fd let go before it is claimed (Finish, Session.Finish, Close, DropSession) is
closed here, at once if it is rebuilt, else as soon as its thread is done; `settle`
waits for those threads, so that an update that ends holds no memfd of the old boot.
Everything but the threads' rebuilds runs on the event loop, so no lock is needed.
"""

import asyncio
import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from liveupdated.backends import Key
from liveupdated.core.orchestrator import FdEntry

WORKERS = min(4, os.cpu_count() or 1)
INLINE_BYTES = 64 << 10  # apparent size up to which an fd is rebuilt on the event loop
STEP = (8, 256 << 10)  # fds and bytes rebuilt in one step of the loop, at most
JOB = (8, 16 << 20)  # the same for one job of a worker thread

Rebuild = Callable[[Key, FdEntry], int]
CarriedSize = Callable[[Key], int | None]  # the backend's carried_size
Batch = list[tuple[Key, FdEntry, asyncio.Future[None]]]


class _Lane:
    """Fds waiting for their rebuild: those asked for first, then the others in order."""

    def __init__(self) -> None:
        self.urgent: dict[Key, tuple[FdEntry, int]] = {}  # each with its carried size
        self.ahead: dict[Key, tuple[FdEntry, int]] = {}

    def __bool__(self) -> bool:
        return bool(self.urgent or self.ahead)

    def hurry(self, key: Key) -> None:
        if key in self.ahead:
            self.urgent[key] = self.ahead.pop(key)

    def discard(self, key: Key) -> None:
        self.urgent.pop(key, None)
        self.ahead.pop(key, None)

    def take(self, limits: tuple[int, int]) -> list[tuple[Key, FdEntry]]:
        """The next fds, at least one, up to `limits` (count, carried bytes)."""
        pending = self.urgent or self.ahead
        batch: list[tuple[Key, FdEntry]] = []
        size = 0
        while pending and (not batch or (len(batch) < limits[0] and size < limits[1])):
            key = next(iter(pending))
            entry, carried = pending.pop(key)
            batch.append((key, entry))
            size += carried
        return batch


class Restores:
    def __init__(self, rebuild: Rebuild, carried_size: CarriedSize,
                 workers: int = WORKERS) -> None:
        self._rebuild = rebuild
        self._carried_size = carried_size
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._waits: dict[Key, asyncio.Future[None]] = {}  # queued or in a thread
        self._inline = _Lane()  # small fds, rebuilt on the loop
        self._threaded = _Lane()  # large ones, rebuilt by the workers
        self._step: asyncio.Handle | None = None  # the loop's next step, if any
        self._jobs: dict[asyncio.Future[list[int | BaseException]], Batch] = {}  # in threads
        self._done: dict[Key, int] = {}  # rebuilt and checked, not yet claimed

    def ahead(self, entries: Iterable[tuple[Key, FdEntry]]) -> None:
        """Rebuild these, in this order, before anyone asks."""
        for key, entry in entries:
            if key not in self._waits and key not in self._done:
                self._waits[key] = self._new_wait()
                self._queue(key, entry, urgent=False)
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
            self._queue(key, entry, urgent=True)
        else:
            self._inline.hurry(key)
            self._threaded.hurry(key)
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
        self._inline.discard(key)
        self._threaded.discard(key)
        wait = self._waits.pop(key, None)
        if wait is not None and not self._in_a_thread(wait) and not wait.done():
            wait.set_result(None)

    async def settle(self, session: str | None = None) -> None:
        """Until no rebuild (of `session`'s fds, if given) is under way: each one let go
        is closed by then. One VMM's Session.Finish waits for its own fds only."""
        while jobs := [job for job, batch in self._jobs.items()
                       if session is None or any(key[0] == session for key, _, _ in batch)]:
            await asyncio.wait(jobs)

    def close(self) -> None:
        for key in [*self._waits, *self._done]:
            self.drop(key)
        if self._step is not None:
            self._step.cancel()
            self._step = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _in_a_thread(self, wait: asyncio.Future[None]) -> bool:
        """Is the key of `wait` being rebuilt by a worker (its fd is closed when done)?"""
        return any(w is wait for batch in self._jobs.values() for _, _, w in batch)

    def _queue(self, key: Key, entry: FdEntry, *, urgent: bool) -> None:
        size = self._carried_size(key)
        if size is not None and size <= INLINE_BYTES:
            lane, carried = self._inline, size
        else:  # unknown: large until known otherwise
            lane, carried = self._threaded, entry.size if size is None else size
        (lane.urgent if urgent else lane.ahead)[key] = (entry, carried)

    def _new_wait(self) -> asyncio.Future[None]:
        wait = asyncio.get_running_loop().create_future()
        wait.add_done_callback(_retrieved)
        return wait

    def _pump(self) -> None:
        """A step of the loop booked if small fds wait; jobs started while a worker is
        free, a few fds a job (one thread hop and one wake-up of the loop for several:
        when many VMMs ask at once, a job per fd cost each reply a thread hop)."""
        loop = asyncio.get_running_loop()
        if self._inline and self._step is None:
            self._step = loop.call_soon(self._step_inline)
        while len(self._jobs) < self._workers and self._threaded:
            batch = [(k, e, self._waits[k]) for k, e in self._threaded.take(JOB)]
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers, "liveupdated-restore")
            job = loop.run_in_executor(
                self._executor, self._rebuild_all, [(k, e) for k, e, _ in batch])
            self._jobs[job] = batch
            job.add_done_callback(functools.partial(self._job_ended, batch))

    def _step_inline(self) -> None:
        """One step on the loop: a few small fds rebuilt; the next step booked if more
        wait (after whatever else is ready, so requests are answered in between)."""
        self._step = None
        batch = [(k, e, self._waits[k]) for k, e in self._inline.take(STEP)]
        self._ended(batch, self._rebuild_all([(k, e) for k, e, _ in batch]))

    def _rebuild_all(self, batch: list[tuple[Key, FdEntry]]) -> list[int | BaseException]:
        """Each fd rebuilt, or the error that stopped it (in a worker thread or not)."""
        outcomes: list[int | BaseException] = []
        for key, entry in batch:
            try:
                outcomes.append(self._rebuild(key, entry))
            except Exception as exc:  # handed to whoever waits for it
                outcomes.append(exc)
        return outcomes

    def _job_ended(self, batch: Batch, job: asyncio.Future[list[int | BaseException]]) -> None:
        self._jobs.pop(job, None)
        if job.cancelled():
            outcomes: list[int | BaseException] = [
                OSError(f"the restore of {key[0]}/{key[1]} was stopped") for key, _, _ in batch]
        elif job.exception() is not None:
            outcomes = [job.exception()] * len(batch)  # type: ignore[list-item]
        else:
            outcomes = job.result()
        self._ended(batch, outcomes)

    def _ended(self, batch: Batch, outcomes: list[int | BaseException]) -> None:
        for (key, _, wait), outcome in zip(batch, outcomes, strict=True):
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
