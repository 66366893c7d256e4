"""liveupdated: start-up, recovery, wiring of core, journal, backend, bus and systemd.

The only module that knows every part. It recovers the state (journal, fd store,
handover) before it owns the bus name and says READY=1, and it exits non-zero if it
loses the bus, so that systemd restarts it with its fd store.
"""

import asyncio
import contextlib
import gc
import os
import resource
import shlex
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable

import structlog
from dbus_fast import Message, MessageType, NameFlag, RequestNameReply

from liveupdated import logs
from liveupdated.backends import Backend
from liveupdated.backends.simulated import SimulatedBackend
from liveupdated.bus import BUS_NAME
from liveupdated.bus.address import connect
from liveupdated.bus.callers import Callers
from liveupdated.bus.connection import FdOwningBus, fd_guard, limit_calls
from liveupdated.bus.manager import Manager
from liveupdated.bus.preserve import PreserveFdCalls
from liveupdated.bus.session import SessionObjects
from liveupdated.bus.visibility import Visibility
from liveupdated.config import Config, parse_args
from liveupdated.core.errors import LiveUpdateError
from liveupdated.core.names import MANAGER_PATH
from liveupdated.core.orchestrator import Orchestrator, Phase
from liveupdated.core.records import Record
from liveupdated.journal import Journal
from liveupdated.service import Listeners, LiveUpdate
from liveupdated.systemd import Notifier, boot_id, take_listen_fds
from liveupdated.vault import Vault

log = structlog.get_logger("liveupdated")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_backend(config: Config) -> Backend:
    if config.resolved_backend() == "kernel":
        from liveupdated.backends.kernel import KernelBackend

        return KernelBackend()
    return SimulatedBackend(config.handover_area)


def replay(config: Config) -> tuple[Orchestrator, Journal, bool]:
    """The core rebuilt from the journal, and whether any journal record was lost."""
    journal, records, damages = Journal.open(config.state_dir / "journal")
    for damage in damages:
        event = "journal_tail_cut" if damage.cut else "journal_record_skipped"
        log.error(event, offset=damage.offset, bytes=damage.length, reason=damage.reason)
    core = Orchestrator(config.limits)
    skipped = 0
    for number, record in enumerate(records):
        try:
            core.apply(record)
        except (KeyError, ValueError):  # it depended on a record that was lost
            skipped += 1
            log.error("journal_record_inapplicable", number=number, type=record.type)
    return core, journal, bool(skipped or any(not d.cut for d in damages))


def reclaim_fds(core: Orchestrator, vault: Vault, journal_damaged: bool) -> list[Record]:
    """Match the fds systemd kept for us with the journal: keep, close or report."""
    corrupted: list[tuple[str, str, int]] = []
    for name, fd in take_listen_fds():
        session, _, token = name.partition("/")
        entry = core.sessions[session].fds.get(token) if session in core.sessions else None
        # After the reboot only restored fds are ours; earlier ones are the old boot's.
        known = entry is not None and (core.phase is not Phase.UPDATED or entry.restored)
        if known and (session, token) not in vault:
            vault.keep((session, token), fd, store=False)
        elif journal_damaged and entry is None and session in core.sessions:
            log.error("fd_record_corrupted", session=session, token=token)
            vault.keep((session, token), fd, store=False)
            corrupted.append((session, token, os.fstat(fd).st_size))
        else:
            log.warning("unknown_fd_closed", fdname=name)
            vault.refuse(name, fd)
    records = core.fds_corrupted(corrupted)
    if core.phase is Phase.UPDATED:
        return records  # fds not held come back from the handover on request
    missing = [
        (s.name, t) for s in core.sessions.values() for t in s.fds if (s.name, t) not in vault
    ]
    for session, token in missing:
        log.error("fd_lost", session=session, token=token,
                  hint="no copy in the fd store; UnpreserveFd it and preserve it again")
    return records + core.fds_lost(missing)


def recover_handover(core: Orchestrator, backend: Backend) -> list[Record]:
    """Is this start the first of a new boot? Then the handover is our fds' source now."""
    handover = backend.find_handover()
    if handover is None:
        return []
    if core.phase is Phase.FROZEN:
        if handover.damage:
            log.error("handover_damaged", error=handover.damage,
                      hint="every RetrieveFd will fail with Corrupted; Finish releases it")
        else:
            log.info("handover_found", previous_boot=handover.boot_id, fds=len(handover.keys))
        return core.rebooted(handover.boot_id)
    if core.phase is not Phase.UPDATED:
        log.warning("stale_handover_discarded", phase=core.phase.value)
        backend.discard_handover()
    return []


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.notifier = Notifier()

    def recover(self) -> LiveUpdate:
        """Journal, handover and fd store into one consistent state, made durable."""
        core, journal, damaged = replay(self.config)
        vault = Vault(self.notifier)
        backend = make_backend(self.config)
        handover = recover_handover(core, backend)
        journal.commit_now(handover + reclaim_fds(core, vault, damaged))
        return LiveUpdate(
            core, journal, vault, backend, self.notifier, self.config.freeze_timeout
        )

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
        bus.add_message_handler(_name_watcher(departed, callers, service))
        await _add_match(bus, NAME_OWNER_CHANGED)
        if core.phase is Phase.NORMAL:
            for client in core.clients():
                if not await callers.has_owner(client):
                    service.client_left(client)
            await service.flush()

        manager = Manager(service, callers, bus)
        service.listeners = Listeners(
            session_added=sessions.add,
            session_removed=sessions.remove,
            session_changed=sessions.changed,
            phase_changed=manager.announce_phase,
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
            log.error("bus_name_taken", name=BUS_NAME, reply=reply.name)
            return 1
        self.notifier.ready(core.status_line())
        log.info("ready", state=core.phase.value, sessions=len(core.sessions),
                 fds=core.fd_count(), backend=service.backend.name, boot_id=boot_id())

        outcome = await self._serve(service, bus, stop, departed, preserve_calls)
        self.notifier.notify("STOPPING=1")
        if outcome in ("stop", "reboot"):
            await preserve_calls.finish()
        if outcome in ("disconnect", "failed"):
            log.error("exiting_for_a_restart", reason=outcome)
            return 1
        bus.disconnect()
        await service.journal.aclose()
        if outcome == "reboot":
            return self._reboot_action()
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
                failed=service.failed.wait(),
                disconnect=bus.wait_for_disconnect(),  # type: ignore[no-untyped-call]
            )
            for helper in helpers:
                helper.cancel()
        return outcome

    def _reboot_action(self) -> int:
        action = self.config.resolved_reboot_action()
        log.info("rebooting", action=action)
        if action == "exit":
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
            await service.flush()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


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


async def _add_match(bus: FdOwningBus, rule: str) -> None:
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[rule],
        )
    )


def main(argv: list[str] | None = None) -> None:
    gc.disable()  # start-up allocates thousands of records and fds that all stay alive
    config = parse_args(argv)
    logs.configure(config.log_level)
    raise_fd_limit()
    daemon = Daemon(config)
    try:
        code = asyncio.run(daemon.run())
    except LiveUpdateError as exc:
        log.error("startup_failed", error=exc.name, message=str(exc))
        code = 1
    finally:
        daemon.notifier.close()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
