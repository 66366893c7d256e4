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
from liveupdated.backends import UNKNOWN_BOOT, Backend, Key
from liveupdated.backends.simulated import SimulatedBackend
from liveupdated.bus import BUS_NAME, driver
from liveupdated.bus.address import connect
from liveupdated.bus.callers import Callers
from liveupdated.bus.connection import FdOwningBus, fd_guard, limit_calls
from liveupdated.bus.manager import Manager
from liveupdated.bus.preserve import PreserveFdCalls
from liveupdated.bus.retrieve import RetrieveFdCalls
from liveupdated.bus.session import SessionObjects
from liveupdated.bus.visibility import Visibility
from liveupdated.config import Config, parse_args
from liveupdated.core.errors import LiveUpdateError, Storage
from liveupdated.core.names import MANAGER_PATH, is_name
from liveupdated.core.orchestrator import Orchestrator, Phase
from liveupdated.core.records import DaemonStarted, Record
from liveupdated.journal import Journal, Watermark
from liveupdated.service import Listeners, LiveUpdate
from liveupdated.statedir import STORAGE_ERRNOS, describe, holds_listen_fds
from liveupdated.systemd import Notifier, boot_id, take_listen_fds
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
        except (KeyError, ValueError):  # it depended on a record that was lost
            skipped += 1
            log.error("journal_record_inapplicable", number=number, type=record.type)
    return core, journal, bool(skipped or damages)


def reclaim_fds(
    core: Orchestrator,
    vault: Vault,
    inherited: list[tuple[str, int]],
    journal_damaged: bool,
    carried: Callable[[Key, int], None] | None = None,
) -> list[Record]:
    """Match the fds systemd kept for us with the journal. Recovery never closes an fd
    the journal cannot explain: after damage such an fd is kept and reported as
    Corrupted in its session when the session survived; any other is quarantined for an
    admin. (A journal cut at a frame boundary looks intact, so an unknown fd may be a
    PreserveFd whose record never became durable, or one whose record was lost: only an
    admin can tell.)

    After the reboot the fds of the old boot not yet restored are, for a backend whose
    carrier is the fd store (`carried`, fdstore), the handover itself: given to it, kept
    in the store. For the others they are stale and closed."""
    corrupted: list[tuple[str, str, int]] = []
    quarantined: list[tuple[str, str, int, str]] = []
    unnamed: set[str] = set()
    for name, fd in inherited:
        session, _, token = name.partition("/")
        key = (session, token)
        entry = core.sessions[session].fds.get(token) if session in core.sessions else None
        # After the reboot only restored fds are ours; earlier ones are the old boot's.
        known = entry is not None and (core.phase is not Phase.UPDATED or entry.restored)
        if key in vault:  # the same name twice: the first is held, this one is spare
            log.warning("duplicate_fd_closed", fdname=name)
            os.close(fd)
        elif entry is not None and not known and carried is not None:
            carried(key, fd)  # the carrier's: RetrieveFd dups it, Finish releases it
        elif known or key in core.quarantine:
            vault.keep(key, fd, store=False)
        elif entry is None and is_name(session) and is_name(token):
            vault.keep(key, fd, store=False)
            size = os.fstat(fd).st_size
            if session in core.sessions and journal_damaged:
                log.error("fd_record_corrupted", session=session, token=token, bytes=size)
                corrupted.append((session, token, size))
            else:
                log.error("fd_quarantined", session=session, token=token, bytes=size,
                          hint="an admin may RetrieveQuarantined or ReleaseQuarantined it")
                why = ("its session's records were lost" if session not in core.sessions
                       else "the journal does not record it")
                quarantined.append((session, token, size, why))
        elif entry is None:  # a name that is no session/token
            renamed = ("unnamed", f"fd{len(quarantined)}-{os.getpid()}")
            vault.keep(renamed, fd)  # stored under a name the next start can match
            unnamed.add(name)
            log.error("fd_quarantined", fdname=name, session=renamed[0], token=renamed[1])
            quarantined.append((*renamed, os.fstat(fd).st_size, f"stored as {name!r}"))
        else:  # the old boot's: the handover is the source of its content now
            log.info("old_boot_fd_closed", fdname=name)
            vault.refuse(name, fd)
    for name in unnamed:
        vault.forget_stored(name)
    records = core.fds_corrupted(corrupted) + core.quarantine_fds(quarantined)
    if core.phase is Phase.UPDATED:
        return records  # fds not held come back from the handover on request
    missing = [
        (s.name, t) for s in core.sessions.values() for t in s.fds if (s.name, t) not in vault
    ]
    for session, token in missing:
        log.error("fd_lost", session=session, token=token,
                  hint="no copy in the fd store; in normal, UnpreserveFd it and preserve "
                       "it again (Cancel an update first)")
    return records + core.fds_lost(missing)


def recover_handover(core: Orchestrator, backend: Backend) -> list[Record]:
    """Is this start the first of a new boot? Only on evidence (another boot id, the old
    daemon's KexecSimulated, or more soft-reboots or kexecs counted by systemd than at
    Reboot): a restart between Reboot and the kexec is a crash in FROZEN, whose handover
    is discarded so that Cancel or another Reboot works."""
    handover = backend.find_handover()
    if core.phase is Phase.FROZEN:
        counts = backend.reboot_counts() if core.reboot is not None else None
        if handover is not None and core.is_new_boot(
            handover.boot_id, boot_id(), readable=handover.boot_id != UNKNOWN_BOOT,
            soft_reboots=counts.soft_reboots if counts else None,
            kexecs=counts.kexecs if counts else None,
        ):
            previous = handover.boot_id
            if previous == UNKNOWN_BOOT and core.reboot is not None:
                previous = core.reboot.boot_id  # the fd store says no boot: the journal does
            if handover.damage:
                log.error("handover_damaged", error=handover.damage,
                          hint="every RetrieveFd will fail with Corrupted; Finish releases it")
            else:
                log.info("handover_found", previous_boot=previous, fds=len(handover.keys),
                         backend=backend.name, **(counts._asdict() if counts else {}))
            return core.rebooted(previous)
        records: list[Record] = []
        if core.reboot is not None:
            log.error("reboot_interrupted", hint="no evidence of a new boot: the daemon "
                      "restarted before the kexec; the state is frozen (Cancel or Reboot)")
            records = core.reboot_failed("the daemon restarted before the kexec")
        if handover is not None and not backend.keeps_fd_store:
            log.warning("unfinished_handover_discarded", phase=core.phase.value)
            _discard(backend)
        return records
    if handover is not None and core.phase is not Phase.UPDATED and not backend.keeps_fd_store:
        log.warning("stale_handover_discarded", phase=core.phase.value)
        _discard(backend)
    return []


def _discard(backend: Backend) -> None:
    """A handover no one will take; left in place if the disk refuses (the next start
    with a writable disk discards it)."""
    try:
        backend.discard_handover()
    except OSError as exc:
        log.error("handover_discard_failed", error=str(exc))


class Daemon:
    def __init__(self, config: Config, storage_problem: str = "") -> None:
        self.config = config
        self.notifier = Notifier()
        self.storage_problem = storage_problem  # the disk refused a write at start-up
        self.journal_damaged = False

    def recover(self) -> LiveUpdate:
        """Journal, handover and fd store into one consistent state, made durable. On a
        disk that refuses writes (with fds held) it is only read, and the service starts
        degraded: what recovery decided is written by its first successful compaction."""
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
        try:
            core, journal, damaged = replay(self.config, refused)
        except OSError as exc:  # the disk refused to create or repair the journal
            if not (holds_fds and exc.errno in STORAGE_ERRNOS):
                raise
            refused = exc
            core, journal, damaged = replay(self.config, refused)
        damaged = damaged or bool(lost_tail)
        self.journal_damaged = damaged
        self._keep_mark(journal, mark_fd)
        vault = Vault(self.notifier)
        backend = make_backend(self.config, _from_any_thread(vault.forget_stored),
                               [name for name, _ in inherited],
                               _store_from_any_thread(self.notifier), adopted)
        if backend.name != "kernel":
            for name, fd in adopted.items():  # another backend now: nothing to adopt
                log.warning("kernel_session_fd_closed", fdname=name)
                vault.refuse(name, fd)
        adopt = getattr(backend, "adopt", None) if backend.keeps_fd_store else None
        recovered = recover_handover(core, backend) + reclaim_fds(
            core, vault, inherited, damaged, adopt
        )
        # Which release runs in which boot, once a start: the journal outlives an upgrade
        # of the package and the kexec. Compaction keeps the latest.
        started = DaemonStarted(version=__version__, boot_id=boot_id(),
                                at_usec=time.time_ns() // 1000)
        core.apply(started)
        recovered.append(started)
        service = LiveUpdate(
            core, journal, vault, backend, self.notifier, self.config.freeze_timeout
        )
        if refused is None:
            try:
                journal.commit_now(recovered)
            except OSError as exc:
                if not (holds_fds and exc.errno in STORAGE_ERRNOS):
                    raise
                refused = exc
                journal.refuse(exc)
        if refused is not None:
            service.storage_problem = describe(refused)
            log.critical("storage_failed", error=service.storage_problem,
                         hint="running degraded: changes are refused until the state dir "
                              "can be written; RetrieveFd and Cancel work")
        return service

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
        sessions = SessionObjects(bus, service, callers)
        departed: asyncio.Queue[str] = asyncio.Queue()
        preserve_calls = PreserveFdCalls(bus, service, callers, sessions)
        bus.add_message_handler(limit_calls(bus))  # first: it may refuse a call
        bus.add_message_handler(fd_guard(sessions.__contains__, preserve_calls.take))
        bus.add_message_handler(Visibility(bus, service, callers, sessions).handle)
        bus.add_message_handler(RetrieveFdCalls(bus, service, callers, sessions).handle)
        bus.add_message_handler(sessions.answer_missing)
        bus.add_message_handler(_name_watcher(departed, callers, service))
        await driver.add_match(bus, NAME_OWNER_CHANGED)
        if core.phase is Phase.NORMAL and not self.journal_damaged:
            # After damage the phase itself may be a lost record's: drop nothing.
            for client in core.clients():
                if not await callers.has_owner(client):
                    service.client_left(client)
            await service.flush()

        manager = Manager(service, callers, bus, self.config)
        service.listeners = Listeners(
            session_added=sessions.add,
            session_removed=sessions.remove,
            session_changed=sessions.changed,
            phase_changed=manager.announce_phase,
            freeze_started=manager.freeze_started,
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
        if outcome in ("stop", "reboot"):
            await preserve_calls.finish()
        if outcome == "disconnect":
            log.error("exiting_for_a_restart", reason=outcome)
            return 1
        bus.disconnect()
        if outcome == "reboot" and self.config.resolved_reboot_action() == "exit":
            # No real reboot follows: this exit is the kexec. Recorded as the old boot's
            # last act, it is the next start's evidence of a "new boot" with the same
            # boot id; a crash before this point is a restart in FROZEN instead.
            service.journal.enqueue(core.simulated_kexec_done(boot_id()))
        await service.journal.aclose()
        if outcome == "reboot":
            return self._reboot_action(service.backend.name)
        log.info("stopped", reason=outcome)
        return 0

    async def _serve(
        self,
        service: LiveUpdate,
        bus: FdOwningBus,
        stop: asyncio.Event,
        departed: asyncio.Queue[str],
        preserve_calls: PreserveFdCalls,
    ) -> str:
        """Serve until a signal, a completed Reboot() or the loss of the bus."""
        async with asyncio.TaskGroup() as tasks:
            helpers = [
                tasks.create_task(self._drop_departed(departed, service)),
                tasks.create_task(preserve_calls.answer()),
            ]
            interval = self.notifier.watchdog_interval()
            if interval:
                helpers.append(tasks.create_task(self._watchdog(interval)))
            outcome = await _first(
                stop=stop.wait(),
                reboot=service.reboot_requested.wait(),
                disconnect=bus.wait_for_disconnect(),  # type: ignore[no-untyped-call]
            )
            for helper in helpers:
                helper.cancel()
        return outcome

    def _reboot_action(self, backend: str) -> int:
        action = self.config.resolved_reboot_action()
        log.info("rebooting", action=action, backend=backend)
        if action == "exit":
            return 0
        if action == "soft-reboot" or (action == "kexec" and backend == "fdstore"):
            # PID 1 holds the fds in the fd store: it reboots, over D-Bus, as systemctl
            # does: the target started irreversibly, so that every unit is stopped in
            # order (Manager.SoftReboot()/KExec() would skip that and SIGKILL them). This
            # unit's store is kept (FileDescriptorStorePreserve=yes).
            from liveupdated.systemd import Pid1Error, pid1

            target = "soft-reboot.target" if action == "soft-reboot" else "kexec.target"
            try:
                pid1(call="StartUnit", args=(target, "replace-irreversibly"), signature="ss")
            except Pid1Error as exc:
                log.error("reboot_action_failed", action=action, error=str(exc))
                return 1
            return 0
        if action == "kexec":  # the syscall itself, from the process holding the sessions
            from liveupdated.backends.luo_uapi import reboot_kexec

            try:
                reboot_kexec()
            except OSError as exc:
                log.error("reboot_action_failed", action=action, error=exc.strerror)
                return 1
        result = subprocess.run(shlex.split(action), check=False)
        if result.returncode != 0:
            log.error("reboot_action_failed", action=action, status=result.returncode)
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
