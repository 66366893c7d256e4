"""liveupdated: start-up, recovery, wiring of core, journal, backend, bus and systemd.

The only module that knows every part. It recovers the state (journal, fd store,
handover) before it owns the bus name and says READY=1, and it exits non-zero if it
loses the bus, so that systemd restarts it with its fd store.
"""

import asyncio
import contextlib
import errno
import gc
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import structlog
from dbus_fast import Message, MessageType, NameFlag, RequestNameReply

from liveupdated import __version__, logs
from liveupdated.backends import Backend, Key
from liveupdated.backends.simulated import SimulatedBackend
from liveupdated.bus import BUS_NAME, driver
from liveupdated.bus.address import connect
from liveupdated.bus.callers import Callers
from liveupdated.bus.connection import FdOwningBus, fd_guard, limit_calls, watch_owners
from liveupdated.bus.manager import Manager
from liveupdated.bus.preserve import PreserveFdCalls
from liveupdated.bus.retrieve import RetrieveFdCalls
from liveupdated.bus.session import SessionObjects
from liveupdated.bus.signatures import reject_wrong_signatures
from liveupdated.bus.visibility import Visibility
from liveupdated.config import Config, parse_args
from liveupdated.core.errors import LiveUpdateError, Storage
from liveupdated.core.names import MANAGER_PATH
from liveupdated.core.orchestrator import Orchestrator, Phase
from liveupdated.core.records import DaemonStarted, Record
from liveupdated.core.recovery import (
    Adopt,
    BootEvidence,
    Close,
    DiscardHandover,
    ForgetName,
    HandoverFound,
    Hold,
    HoldRenamed,
    KeepHandover,
    Rebuild,
    Recovery,
    Spare,
    StartFacts,
    StoredFd,
    recover,
)
from liveupdated.durable import STORAGE_ERRNOS, describe
from liveupdated.journal import Journal, Watermark
from liveupdated.service import Listeners, LiveUpdate
from liveupdated.statedir import holds_listen_fds
from liveupdated.systemd import Notifier, boot_id, pid1_start, take_listen_fds
from liveupdated.vault import Vault

log = structlog.get_logger("liveupdated")
T = TypeVar("T")

JOURNAL_MARK = "@journal-mark"  # FDNAME of the watermark: no session/token has an "@"
LUO_STORE_PREFIX = "@luo/"  # the kernel backend's own fds (backends.kernel.STORE_PREFIX)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_backend(
    config: Config,
    forget_stored: Callable[[str], None] = lambda name: None,
    inherited: Sequence[str] | None = None,
    store: Callable[[str, int], None] = lambda name, fd: None,
    adopted: Mapping[str, int] | None = None,
) -> Backend:
    """The configured backend; `forget_stored` drops a name from the fd store, `store`
    puts an fd of the backend's own there, `inherited` are the names systemd passed
    (fdstore), `adopted` the backend's own fds it passed back (kernel)."""
    resolved = config.resolved_backend()
    if resolved == "kernel":
        from liveupdated.backends.kernel import KernelBackend

        return KernelBackend(store=store, forget=forget_stored, adopted=adopted)
    if resolved == "fdstore":
        from liveupdated.backends.fdstore import FdStoreBackend

        return FdStoreBackend(
            forget_stored, kexec=config.resolved_reboot_action() == "kexec",
            inherited=inherited,
        )
    return SimulatedBackend(config.handover_area)


def replay(
    config: Config, refused: OSError | None = None
) -> tuple[Orchestrator, Journal, bool]:
    """The core rebuilt from the journal, and whether the journal was damaged: then the
    fd store may hold fds that no surviving record explains."""
    journal, records, damages = Journal.open(config.state_dir / "journal", refused)
    for damage in damages:
        event = "journal_tail_cut" if damage.cut else "journal_record_skipped"
        log.error(event, offset=damage.offset, bytes=damage.length, reason=damage.reason,
                  copy=str(damage.quarantine or ""))
    core = Orchestrator(config.limits)
    skipped = 0
    for number, record in enumerate(records):
        try:
            core.apply(record)
        except (KeyError, ValueError, StopIteration):  # it depended on a record that was lost
            skipped += 1
            log.error("journal_record_inapplicable", number=number, type=record.type)
    return core, journal, bool(skipped or damages)


def stored_facts(inherited: Sequence[tuple[str, int]]) -> tuple[StoredFd, ...]:
    """What recovery needs of each fd systemd passed back: metadata and sizes only."""
    facts = []
    for index, (name, fd) in enumerate(inherited):
        st = os.fstat(fd)
        facts.append(StoredFd(index, name, st.st_dev, st.st_ino, st.st_size))
    return tuple(facts)


def handover_found(backend: Backend) -> HandoverFound | None:
    handover = backend.find_handover()
    if handover is None:
        return None
    return HandoverFound(boot_id=handover.boot_id, keys=handover.keys,
                         damage=handover.damage or "", in_store=backend.keeps_fd_store)


def boot_evidence(core: Orchestrator, backend: Backend) -> BootEvidence:
    """The boot id, PID 1's start time and, where a Reboot recorded them, systemd's
    counts of soft-reboots and kexecs."""
    counts = backend.reboot_counts() if core.reboot is not None else None
    return BootEvidence(
        boot_id=boot_id(), pid1_start=pid1_start(),
        soft_reboots=counts.soft_reboots if counts else None,
        kexecs=counts.kexecs if counts else None,
    )


def carry_out(
    recovery: Recovery,
    inherited: Sequence[tuple[str, int]],
    vault: Vault,
    backend: Backend,
) -> list[Key]:
    """The effects of recovery, in order; returns the keys to rebuild from the handover."""
    rebuild: list[Key] = []
    for event in recovery.events:
        getattr(log, event.level)(event.event, **dict(event.fields))
    for effect in recovery.effects:
        match effect:
            case Hold(index=index, key=key):
                vault.keep(key, inherited[index][1], store=False)
            case HoldRenamed(index=index, key=key):
                vault.keep_renamed(key, inherited[index][1])
            case Adopt(index=index, key=key):  # decided only where backend.keeps_fd_store
                backend.adopt(key, inherited[index][1])
            case Spare(index=index, key=key):
                vault.keep_spare(key, inherited[index][1])
            case Close(index=index, why=why):
                log.info("duplicate_fd_closed", fdname=inherited[index][0], reason=why)
                os.close(inherited[index][1])
            case ForgetName(name=name):
                vault.forget_stored(name)
            case Rebuild(key=key):
                rebuild.append(key)
            case DiscardHandover(why=why):
                log.warning("stale_handover_discarded", reason=why)
                try:
                    backend.discard_handover()
                except OSError as exc:  # the next start with a writable disk discards it
                    log.error("handover_discard_failed", error=describe(exc))
            case KeepHandover(why=why):
                log.info("handover_kept", reason=why)
    return rebuild


def rebuild_from_handover(core: Orchestrator, vault: Vault, backend: Backend,
                          keys: Sequence[Key]) -> list[Record]:
    """The fds recovery could find only in the handover, rebuilt (checksums checked) into
    the daemon and the store; one that fails is Corrupted, the handover stays."""
    corrupted: list[tuple[str, str, int]] = []
    for key in keys:
        entry = core.sessions[key[0]].fds[key[1]]
        try:
            fd = backend.retrieve_fd(key, entry)
        except (LiveUpdateError, OSError) as exc:
            log.error("handover_rebuild_failed", session=key[0], token=key[1], error=str(exc))
            corrupted.append((key[0], key[1], entry.size))
            continue
        vault.keep(key, fd)
        log.info("fd_rebuilt_from_handover", session=key[0], token=key[1], bytes=entry.size)
    return core.fds_corrupted(corrupted)


def reboots_in_process(action: str, backend: Backend) -> bool:
    """The reboot is this process's own doing once the serve loop ends: its exit (the
    simulated kexec), or the kexec syscall where the backend makes it itself. Any other
    action is started while the daemon serves on, and the reboot's SIGTERM ends it."""
    return action == "exit" or (action == "kexec" and backend.kexec_in_process)


class Daemon:
    def __init__(self, config: Config, storage_problem: str = "") -> None:
        self.config = config
        self.notifier = Notifier()
        self.storage_problem = storage_problem  # the disk refused a write at start-up
        self.journal_damaged = False

    def recover(self) -> LiveUpdate:
        """Journal, handover and fd store into one consistent state, made durable. On a
        disk that refuses writes (with fds held) it is only read, and the service starts
        degraded: what recovery decided is written by its first successful compaction.
        The decisions are core.recovery's; this gathers its facts and carries them out."""
        refused = OSError(errno.EROFS, self.storage_problem) if self.storage_problem else None
        holds_fds = holds_listen_fds()
        inherited = take_listen_fds()
        mark_fd = next((fd for name, fd in inherited if name == JOURNAL_MARK), -1)
        inherited = [(name, fd) for name, fd in inherited if name != JOURNAL_MARK]
        # The kernel backend's retrieved sessions (and manifests): its own, not the VMs'.
        adopted = {name: fd for name, fd in inherited if name.startswith(LUO_STORE_PREFIX)}
        inherited = [(name, fd) for name, fd in inherited if name not in adopted]
        mark = Watermark.read(mark_fd) if mark_fd >= 0 else None
        lost_tail = mark.disagrees(self.config.state_dir / "journal") if mark else ""
        if lost_tail:  # a cut at a frame boundary reads as a whole, shorter journal
            log.error("journal_tail_lost", problem=lost_tail)
        core, journal, damaged, refused, unreadable = self._replay(refused, holds_fds)
        damaged = damaged or bool(lost_tail)
        self.journal_damaged = damaged
        if not unreadable:
            self._keep_mark(journal, mark_fd)
        vault = Vault(self.notifier)
        backend = make_backend(self.config, _from_any_thread(vault.forget_stored),
                               [name for name, _ in inherited],
                               _store_from_any_thread(self.notifier), adopted)
        if not backend.stores_own_fds:
            for name, fd in adopted.items():  # another backend now: nothing to adopt
                log.warning("kernel_session_fd_closed", fdname=name)
                vault.refuse(name, fd)
        facts = StartFacts(
            stored=stored_facts(inherited),
            has_store=self.notifier.enabled,
            store_survived=mark_fd >= 0,
            journal_damaged=damaged,
            handover=handover_found(backend),
            boot=boot_evidence(core, backend),
            carrier_keeps_store=backend.keeps_fd_store,
        )
        recovery = recover(core, facts)
        recovered = list(recovery.records)
        rebuild = carry_out(recovery, inherited, vault, backend)
        recovered += rebuild_from_handover(core, vault, backend, rebuild)
        # Which release runs in which boot, once a start: the journal outlives an upgrade
        # of the package and the kexec. Compaction keeps the latest.
        started = DaemonStarted(version=__version__, boot_id=facts.boot.boot_id,
                                at_usec=time.time_ns() // 1000,
                                fd_store=self.notifier.enabled,
                                pid1_start=facts.boot.pid1_start)
        core.apply(started)
        recovered.append(started)
        service = LiveUpdate(
            core, journal, vault, backend, self.notifier, self.config.freeze_timeout
        )
        core.journal_unreadable = unreadable
        if refused is None:
            try:
                journal.commit_now(recovered)
            except OSError as exc:
                if not (holds_fds and exc.errno in STORAGE_ERRNOS):
                    raise
                refused = exc
                journal.refuse(exc)
        if refused is not None:
            core.storage_problem = unreadable or describe(refused)
            log.critical("storage_failed", error=core.storage_problem,
                         hint="running degraded: changes are refused until the state dir "
                              "can be written; RetrieveFd and Cancel work")
        return service

    def _replay(
        self, refused: OSError | None, holds_fds: bool
    ) -> tuple[Orchestrator, Journal, bool, OSError | None, str]:
        """replay(), with the disk's refusals: (core, journal, damaged, refused, why the
        journal could not even be read or "")."""
        try:
            return (*replay(self.config, refused), refused, "")
        except OSError as exc:  # the disk refused to create, repair or even read it
            if not (holds_fds and exc.errno in STORAGE_ERRNOS):
                raise
            refused = exc
        try:
            return (*replay(self.config, refused), refused, "")
        except OSError as again:  # unreadable: every stored fd is quarantined
            unreadable = describe(again)
            log.critical("journal_unreadable", error=unreadable,
                         hint="every fd in the store is quarantined and every change "
                              "refused until the daemon restarts with a readable journal")
            journal = Journal.unreadable(self.config.state_dir / "journal", again)
            return Orchestrator(self.config.limits), journal, True, refused, unreadable

    def _keep_mark(self, journal: Journal, mark_fd: int) -> None:
        """The journal's watermark lives in the fd store, off the disk it judges."""
        if mark_fd < 0:
            mark_fd = os.memfd_create("liveupdated-journal-mark", os.MFD_CLOEXEC)
            self.notifier.store_fd(JOURNAL_MARK, mark_fd)
        journal.mark_fd = mark_fd
        journal.mark_now()

    async def run(self) -> int:
        service = self.recover()
        # The state just built lives as long as the daemon: keep the collector from
        # walking it again and again (collection was off while it was built).
        gc.freeze()
        gc.enable()
        core = service.core
        bus = await connect(self.config.bus, FdOwningBus)
        assert isinstance(bus, FdOwningBus)
        callers = Callers(bus, system_bus=self.config.bus == "system")
        bus.identify = callers.known  # the flow control accounts per uid
        sessions = SessionObjects(bus, service, callers)
        departed: asyncio.Queue[str] = asyncio.Queue()
        preserve_calls = PreserveFdCalls(bus, service, callers, sessions)
        bus.add_message_handler(limit_calls(bus))  # first: it may refuse a call
        bus.add_message_handler(reject_wrong_signatures)  # InvalidArgs, its fds closed
        bus.add_message_handler(fd_guard(sessions.__contains__, preserve_calls.take))
        bus.add_message_handler(Visibility(bus, service, callers, sessions).handle)
        bus.add_message_handler(RetrieveFdCalls(bus, service, callers, sessions).handle)
        bus.add_message_handler(sessions.answer_missing)
        bus.add_message_handler(_name_watcher(departed, callers, service))
        await driver.add_match(bus, NAME_OWNER_CHANGED)
        await self._drop_departed_at_start(service, bus, callers)

        manager = Manager(service, callers, bus, self.config)
        service.listeners = Listeners(
            session_added=sessions.add,
            session_removed=sessions.remove,
            session_changed=sessions.changed,
            phase_changed=manager.announce_phase,
            freeze_started=manager.freeze_started,
            reboot_failed=manager.reboot_failed,
        )
        for session in core.sessions.values():
            sessions.add(session)
        bus.export(MANAGER_PATH, manager)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply is not RequestNameReply.PRIMARY_OWNER:
            from liveupdated.statedir import name_taken  # exit 75, the owner's pid named

            raise await name_taken(bus, BUS_NAME)
        self.notifier.ready(core.status_line())
        log.info("ready", state=core.phase.value, sessions=len(core.sessions),
                 fds=core.fd_count(), backend=service.backend.name, boot_id=boot_id(),
                 version=__version__)

        outcome = await self._serve(service, bus, stop, departed, preserve_calls)
        self.notifier.notify("STOPPING=1")
        if outcome in ("stop", "reboot", "rebooting"):
            await preserve_calls.finish()
        if outcome == "disconnect":
            log.error("exiting_for_a_restart", reason=outcome)
            return 1
        bus.disconnect()
        if outcome == "reboot" and self.config.resolved_reboot_action() == "exit":
            # No real reboot follows: this exit is the kexec. Recorded as the old boot's
            # last act, it is the next start's evidence of a "new boot" with the same
            # boot id; a crash before this point is a restart in FROZEN instead.
            with core.unconditional():
                service.journal.enqueue(core.simulated_kexec_done(boot_id()))
        await service.journal.aclose()
        if outcome == "reboot":
            return self._reboot_in_process(service.backend.name)
        log.info("stopped", reason=outcome)  # "rebooting": the reboot's own stop
        return 0

    async def _drop_departed_at_start(
        self, service: LiveUpdate, bus: FdOwningBus, callers: Callers
    ) -> None:
        """A client is its unique name on this bus (a new bus reuses unique names): the
        sessions of clients gone since, that never went through Prepare, are dropped."""
        (service.core.bus_id,) = await driver.call(bus, "GetId")
        if service.core.phase is not Phase.NORMAL or self.journal_damaged:
            return  # after damage the phase itself may be a lost record's: drop nothing
        service.drop_departed_elsewhere()
        for client in service.core.clients():
            if not await callers.has_owner(client):
                service.client_left(client)
        with contextlib.suppress(Storage):  # degraded: the next compaction has them
            await service.flush()

    async def _serve(
        self,
        service: LiveUpdate,
        bus: FdOwningBus,
        stop: asyncio.Event,
        departed: asyncio.Queue[str],
        preserve_calls: PreserveFdCalls,
    ) -> str:
        """Serve until a signal, the loss of the bus, or a completed Reboot() whose action
        is the daemon's own exit (the simulated kexec) or the kexec syscall. Any other
        reboot action runs while the daemon serves on: the reboot's SIGTERM ends it
        ("rebooting"); a failed action, or no reboot within --reboot-timeout, leaves it
        running, frozen, its handover kept (RebootFailed)."""
        in_process = reboots_in_process(self.config.resolved_reboot_action(), service.backend)
        async with asyncio.TaskGroup() as tasks:
            helpers = [
                tasks.create_task(self._drop_departed(departed, service)),
                tasks.create_task(preserve_calls.answer()),
                tasks.create_task(watch_owners(bus, service.core.clients)),
            ]
            interval = self.notifier.watchdog_interval()
            if interval:
                helpers.append(tasks.create_task(self._watchdog(interval)))
            while True:
                outcome = await _first(
                    stop=stop.wait(),
                    reboot=service.reboot_requested.wait(),
                    # Shielded: _first cancels what did not finish, and this is the
                    # bus's own future, awaited again on the next turn.
                    disconnect=asyncio.shield(
                        bus.wait_for_disconnect()),  # type: ignore[no-untyped-call]
                )
                if outcome != "reboot" or in_process:
                    break
                service.reboot_requested.clear()
                failure = await self._reboot(service, stop)
                if not failure:
                    outcome = "rebooting"
                    break
                await service.reboot_did_not_follow(failure)
            for helper in helpers:
                helper.cancel()
        return outcome

    async def _reboot(self, service: LiveUpdate, stop: asyncio.Event) -> str:
        """Start the reboot action, then wait for the reboot to stop the daemon. "" once
        it did; else why the reboot did not follow."""
        action = self.config.resolved_reboot_action()
        log.info("rebooting", action=action, backend=service.backend.name)
        with contextlib.suppress(Storage):  # the history's HandoverWritten, before PID 1 acts
            await service.flush()
        failure = await asyncio.to_thread(start_reboot_action, action)
        if failure:
            log.error("reboot_action_failed", action=action, error=failure)
            return f"the reboot action {action!r} failed: {failure}"
        timeout = self.config.reboot_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(_REBOOT_POLL, deadline - loop.time()))):
                    await stop.wait()
            if stop.is_set():
                break
            if await asyncio.to_thread(reboot_under_way):
                deadline = loop.time() + timeout  # PID 1 is at it: wait for its SIGTERM
            elif loop.time() >= deadline:
                return (f"the reboot action {action!r} succeeded but no reboot followed "
                        f"within {timeout:g} s")
        return ""

    def _reboot_in_process(self, backend: str) -> int:
        """After the serve loop: the simulated kexec (exit) or the kexec syscall."""
        action = self.config.resolved_reboot_action()
        log.info("rebooting", action=action, backend=backend)
        if action == "kexec":  # the syscall itself, from the process holding the sessions
            from liveupdated.backends.luo_uapi import reboot_kexec

            try:
                reboot_kexec()
            except OSError as exc:  # restarted in FROZEN: recovery keeps the handover
                log.critical("reboot_action_failed", action=action, error=exc.strerror)
                return 1
        return 0

    async def _drop_departed(self, departed: asyncio.Queue[str], service: LiveUpdate) -> None:
        """Make the drops of departed clients' sessions durable."""
        while True:
            await departed.get()
            with contextlib.suppress(Storage):  # degraded: the next compaction has them
                await service.flush()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


_REBOOT_POLL = 1.0  # seconds between two looks at PID 1 while a reboot is awaited
_REBOOT_TARGETS = frozenset({"reboot.target", "soft-reboot.target", "kexec.target",
                             "poweroff.target", "halt.target"})


def start_reboot_action(action: str) -> str:
    """Start the reboot; "" if it was started, else why not. soft-reboot and kexec (the
    fdstore backend's) ask PID 1, as systemctl does: the target started irreversibly, so
    that every unit is stopped in order (Manager.SoftReboot()/KExec() would skip that and
    SIGKILL them); this unit's store is kept (FileDescriptorStorePreserve=yes). Any other
    action is a command."""
    if action in ("soft-reboot", "kexec"):
        from liveupdated.systemd import Pid1Error, pid1

        target = "soft-reboot.target" if action == "soft-reboot" else "kexec.target"
        try:
            pid1(call="StartUnit", args=(target, "replace-irreversibly"), signature="ss")
        except Pid1Error as exc:
            return str(exc)
        return ""
    try:
        result = subprocess.run(shlex.split(action), check=False, stdin=subprocess.DEVNULL)
    except OSError as exc:
        return describe(exc)
    return f"exit status {result.returncode}" if result.returncode != 0 else ""


def reboot_under_way() -> bool:
    """Does PID 1 have a job for a reboot, soft-reboot or kexec target, or is it stopping?
    False where it cannot say (no systemd)."""
    from liveupdated.systemd import Pid1Error, pid1

    try:
        found = pid1(manager_props=("SystemState",), call="ListJobs", signature="")
    except Pid1Error:
        return False
    if found.get("SystemState") == "stopping":
        return True
    jobs = found.get("ListJobs", [])
    return isinstance(jobs, list) and any(
        isinstance(job, list) and len(job) > 1 and job[1] in _REBOOT_TARGETS for job in jobs
    )


def _store_from_any_thread(notifier: Notifier) -> Callable[[str, int], None]:
    """Notifier.store_fd on the loop running now, with a dup of the fd taken at once
    (the caller may close its own before the loop gets to it)."""
    def send(item: tuple[str, int]) -> None:
        name, held = item
        try:
            notifier.store_fd(name, held)
        finally:
            os.close(held)

    on_the_loop = _from_any_thread(send)

    def store(name: str, fd: int) -> None:
        on_the_loop((name, os.dup(fd)))

    return store


def _from_any_thread(fn: Callable[[T], None]) -> Callable[[T], None]:
    """`fn` run on the loop running now (backends call from worker threads), or at once
    where there is no loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return fn

    def call(arg: T) -> None:
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop or loop.is_closed():
            fn(arg)
        else:
            loop.call_soon_threadsafe(fn, arg)

    return call


async def _first(**waits: Awaitable[object]) -> str:
    """Name of the first of the given awaitables to finish; the others are cancelled."""
    tasks = {asyncio.ensure_future(w): name for name, w in waits.items()}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return tasks[next(iter(done))]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _name_watcher(
    departed: asyncio.Queue[str], callers: Callers, service: LiveUpdate
) -> Callable[[Message], bool]:
    def handle(msg: Message) -> bool:
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.sender == "org.freedesktop.DBus"
            and msg.body[0].startswith(":")
            and not msg.body[2]
        ):
            callers.forget(msg.body[0])
            service.client_left(msg.body[0])
            departed.put_nowait(msg.body[0])
        return False

    return handle


NAME_OWNER_CHANGED = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    "member='NameOwnerChanged',path='/org/freedesktop/DBus'"
)


def main(argv: list[str] | None = None) -> None:
    """Run the daemon; whatever stops it is one line and an exit status from statedir."""
    from liveupdated.statedir import StateDirError, holds_listen_fds, open_state, startup_failure

    gc.disable()  # start-up allocates thousands of records and fds that all stay alive
    config = parse_args(argv)
    logs.configure(config.log_level)
    raise_fd_limit()
    holds_fds = holds_listen_fds()  # read before recovery takes them
    try:
        state = open_state(config)  # the lock is held as long as `state` lives
        if not state.writable:
            log.error("state_dir_not_writable", problem=state.problem)
        daemon = Daemon(config, "" if state.writable else state.problem)
        try:
            code = asyncio.run(daemon.run())
        finally:
            daemon.notifier.close()
    except Exception as exc:  # one line, never a traceback
        failure = (
            StateDirError(1, f"{exc.name}: {exc}") if isinstance(exc, LiveUpdateError)
            else startup_failure(exc, config, holds_fds)
        )
        if sys.stderr.isatty():  # a person ran it: the plain line instead of JSON
            print(f"liveupdated: {failure.message}", file=sys.stderr)
        else:
            log.error("startup_failed", message=failure.message, exit_status=failure.exit_status)
        code = failure.exit_status
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
