"""The adapter's life: boot or resume a VM, join liveupdated as its session, and follow
the update (FreezeStarted: stop and save; frozen: QEMU exits; Cancel: continue; after
the kexec: retrieve, load, continue, Finish; back in normal: join again)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass

import sdnotify
import structlog
from dbus_fast import Message

from liveupdated.client import BusError, Client, SessionClient, daemon_signal_rule
from liveupdated.contract import (
    MANAGER_INTERFACE,
    MANAGER_PATH,
    Corrupted,
    LiveUpdateError,
    NoSuchSession,
    NoSuchToken,
    session_path,
)

from .qemu import (
    AdapterError,
    Header,
    Qemu,
    QemuFailed,
    QemuSpec,
    RamMissing,
    StateRejected,
    check_version,
)

RAM_TOKEN = "guest-ram"
STATE_TOKEN = "vm-state"
log = structlog.get_logger("liveupdated-qemu")


@dataclass
class Options:
    spec: QemuSpec
    session: str
    bus: str = "system"
    state_size: int = 1 << 20


@dataclass(frozen=True)
class Event:
    kind: str  # freeze, state, daemon, qemu, term
    old: str = ""
    new: str = ""


class Adapter:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.spec = options.spec
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.notifier = sdnotify.SystemdNotifier()
        self.client: Client | None = None
        self.session: SessionClient | None = None  # joined: our fds are held
        self.qemu: Qemu | None = None
        self.qemu_version = ""
        self.ram = -1
        self.state = -1
        self.saved = False  # the guest is stopped and its state is in the state memfd
        self.freeze_started_at: float | None = None
        self.pauses: dict[str, float] = {}

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> int:
        version = check_version(self.spec.command)
        self.qemu_version = ".".join(map(str, version))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.events.put_nowait, Event("term"))
        self.client = await Client.connect(self.options.bus)
        try:
            await self._subscribe()
            manager = await self._wait_for_update()
            held = await self._retrieve(manager)
            if held is not None:
                self.ram, self.state = held
                await self._resume()
                assert self.session is not None
                if manager == "updated":
                    await self.session.finish()
                    log.info("session_finished", session=self.options.session)
                else:  # an update cancelled while no adapter ran: a new session follows
                    await self.session.close()
                self.session = None
            else:
                await self._boot()
            if await self.client.state() == "normal":
                await self._join()
            self.notifier.notify("READY=1")
            self._status()
            return await self._follow()
        finally:
            if self.qemu is not None:
                await self._stop_qemu()
            self.client.close()

    async def _follow(self) -> int:
        assert self.client is not None
        while True:
            event = await self.events.get()
            log.debug("event", kind=event.kind, old=event.old, new=event.new)
            if event.kind == "freeze" and self.session is not None and not self.saved:
                await self._save()
            elif event.kind == "state":
                done = await self._state_changed(event.old, event.new)
                if done is not None:
                    return done
            elif event.kind == "qemu" and self.qemu is not None and not self.saved:
                code = await self._stop_qemu()
                raise QemuFailed(f"QEMU exited with status {code} while the guest ran: "
                                 "the guest shut down or QEMU failed")
            elif event.kind == "daemon" and self.saved and self.qemu is None:
                log.info("handed_over", session=self.options.session,
                         detail="liveupdated went away with the VM frozen: the update goes on")
                return 0
            elif event.kind == "daemon":
                log.warning("liveupdated_gone", detail="the guest keeps running")
            elif event.kind == "term":
                if self.saved:
                    log.info("exiting_saved", detail="the VM stays saved in liveupdated")
                else:
                    log.info("shutting_down", detail="stopping QEMU")
                return 0

    async def _state_changed(self, old: str, new: str) -> int | None:
        assert self.client is not None
        if new == "frozen" and self.saved and self.qemu is not None:
            code = await self._stop_qemu()  # saved; liveupdated holds RAM and state
            log.info("qemu_exited", status=code, detail="the VM is frozen")
            self._status()
        elif new == "normal" and self.saved:
            if not await self._confirmed("normal"):
                return None
            log.warning("update_cancelled", detail="continuing the guest where it stopped")
            if self.qemu is None:
                await self._resume()
            else:
                Header.clear(self.state)
                await self.qemu.cont()
                self.saved = False
            self._status()
        if new == "normal" and self.session is None:
            await self._join()
        return None

    async def _confirmed(self, state: str) -> bool:
        """Is the Manager in `state` now, by its State property? Asked before a signal
        makes the guest run again: continuing a guest whose state liveupdated holds
        for the reboot would lose the VM, so a signal alone is not enough."""
        assert self.client is not None
        try:
            now = await self.client.state()
        except (LiveUpdateError, BusError) as exc:
            log.warning("state_unconfirmed", expected=state, error=str(exc),
                        detail="the guest stays stopped")
            return False
        if now != state:
            log.warning("state_unconfirmed", expected=state, state=now,
                        detail="a StateChanged the Manager's State does not bear out")
        return now == state

    # -- D-Bus ------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        """Follow liveupdated's Manager signals and its presence on the bus. Only the
        daemon's own signals get here (Client.follow_daemon checks their sender): on the
        system bus any user may broadcast or unicast a look-alike StateChanged."""
        assert self.client is not None

        def on_signal(message: Message) -> None:
            if message.interface != MANAGER_INTERFACE or message.path != MANAGER_PATH:
                return
            if message.member == "FreezeStarted":
                self.freeze_started_at = time.time()
                self.events.put_nowait(Event("freeze"))
            elif message.member == "StateChanged" and message.signature == "ss":
                self.events.put_nowait(Event("state", *message.body))

        def on_owner(owner: str | None) -> None:
            if owner is None:
                self.events.put_nowait(Event("daemon"))

        await self.client.follow_daemon(on_signal, on_owner)
        for member in ("FreezeStarted", "StateChanged"):
            await self.client.add_match(daemon_signal_rule(MANAGER_INTERFACE, member))

    async def _wait_for_update(self) -> str:
        """The Manager's state once this VM may start. While an update holds a session of
        this VM (prepared, frozen: a restart between Freeze and the reboot) the guest must
        not boot fresh: wait for the reboot (updated: resume) or a Cancel (normal)."""
        assert self.client is not None
        state = await self.client.state()
        if state not in ("prepared", "frozen"):
            return state
        names = {s.name for s in await self.client.list_sessions()}
        if self.options.session not in names:
            return state
        log.warning("update_in_progress", session=self.options.session, state=state,
                    detail="liveupdated holds this VM: waiting for the reboot or a Cancel")
        self.notifier.notify(f"STATUS=waiting: liveupdated is {state} with this VM's session")
        while True:
            event = await self.events.get()
            if event.kind == "term":
                raise AdapterError("stopped while waiting for the update")
            if event.kind == "state" and event.new in ("normal", "updated"):
                state = await self.client.state()  # the signal only says: look again
                if state in ("normal", "updated"):
                    return state

    async def _retrieve(self, manager: str) -> tuple[int, int] | None:
        """The session's RAM and state: after the kexec (updated), or after an update
        cancelled while no adapter ran (normal; only with a completed save in it, which a
        running VM's session never has). None when liveupdated holds no session of this
        VM: then it boots fresh."""
        assert self.client is not None
        name = self.options.session
        try:
            if manager == "updated":
                session = await self.client.retrieve_session(name)
            elif manager == "normal" and name in {s.name for s in
                                                  await self.client.list_sessions()}:
                session = SessionClient(self.client, name, session_path(name))
            else:
                raise NoSuchSession(name)
        except NoSuchSession:
            log.info("no_session", session=name, detail="booting the guest fresh")
            return None
        try:
            ram = await session.retrieve_fd(RAM_TOKEN)
        except (NoSuchToken, Corrupted) as exc:
            raise RamMissing(f"session {name} holds no usable guest RAM ({exc}): the guest "
                             "cannot be continued, and is not booted over it") from None
        try:
            state = await session.retrieve_fd(STATE_TOKEN)
        except (NoSuchToken, Corrupted) as exc:
            os.close(ram)
            raise StateRejected(f"session {name} holds no usable device state ({exc}): "
                                "the guest cannot be continued") from None
        if manager == "normal" and Header.read(state) is None:
            os.close(ram)
            os.close(state)
            raise AdapterError(f"session {name} exists and holds no saved VM: another "
                               "adapter runs this VM")
        self.session = session
        return ram, state

    async def _join(self) -> None:
        """Hand RAM and state over (in one call: state requires RAM) and ask for the
        freeze barrier. Only in normal; a failure leaves the VM running, unprotected."""
        assert self.client is not None
        name = self.options.session
        try:
            session = await self.client.create_session(name)
            await session.preserve_fds([(RAM_TOKEN, self.ram, ()),
                                        (STATE_TOKEN, self.state, (RAM_TOKEN,))])
            await session.delay_freeze(True)
        except (LiveUpdateError, BusError) as exc:
            log.error("join_failed", session=name, error=str(exc),
                      detail="the guest runs, but an update now would not carry it")
            return
        self.session = session
        log.info("joined", session=name, ram_size=self.spec.ram_size)
        self._status()

    # -- QEMU -----------------------------------------------------------------------------

    async def _boot(self) -> None:
        self.ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram, self.spec.ram_size)
        self.state = os.memfd_create("vm-state", os.MFD_CLOEXEC)
        os.ftruncate(self.state, self.options.state_size)
        self.qemu = await Qemu.start(self.spec, self.ram, incoming=False)
        self._watch_qemu()
        log.info("booted", session=self.options.session, qemu=self.qemu_version,
                 status=await self.qemu.status())

    async def _resume(self) -> None:
        """Continue the guest from the held RAM and state; never on memory it did not
        leave: without a completed save, or when QEMU refuses the state, it stays off."""
        header = Header.read(self.state)
        if header is None:
            raise StateRejected("the state memfd records no completed save (the guest was "
                                "not stopped by this adapter before the update): not "
                                "continuing it")
        size = os.fstat(self.ram).st_size
        if header.ram_size != self.spec.ram_size or size != self.spec.ram_size:
            raise StateRejected(f"RAM size mismatch: saved {header.ram_size} bytes, the RAM "
                                f"memfd has {size}, --ram says {self.spec.ram_size}")
        started = time.monotonic()
        self.qemu = await Qemu.start(self.spec, self.ram, incoming=True)
        try:
            await self.qemu.load(self.state)
        except StateRejected:
            await self._stop_qemu()
            raise
        loaded = time.monotonic()
        Header.clear(self.state)  # from here on the guest changes RAM: the state is stale
        running_at = await self.qemu.cont()
        self.saved = False
        self._watch_qemu()
        self.pauses = {
            "pause_ms": round((running_at - header.stopped_at) * 1000, 1),
            "save_ms": round(header.saved_ms, 1),
            "start_ms": round((loaded - started) * 1000, 1),
        }
        if header.freeze_started_at is not None:
            self.pauses["freeze_to_running_ms"] = round(
                (running_at - header.freeze_started_at) * 1000, 1)
        log.info("resumed", session=self.options.session, qemu=self.qemu_version,
                 saved_by=header.qemu, running_at=running_at, **self.pauses)

    async def _save(self) -> None:
        assert self.qemu is not None and self.session is not None
        try:
            stopped_at, saved_ms = await self.qemu.save(self.state)
        except AdapterError as exc:
            log.error("save_failed", error=str(exc),
                      detail="continuing the guest; not ready for freeze")
            with contextlib.suppress(Exception):
                await self.qemu.cont()
            return
        Header(self.spec.ram_size, self.qemu_version, stopped_at, self.freeze_started_at,
               saved_ms).write(self.state)
        self.saved = True
        try:
            await self.session.ready_for_freeze()
        except LiveUpdateError as exc:
            log.error("ready_refused", error=str(exc), detail="continuing the guest")
            Header.clear(self.state)
            await self.qemu.cont()
            self.saved = False
            return
        log.info("saved", session=self.options.session, save_ms=round(saved_ms, 1),
                 state_bytes=os.fstat(self.state).st_size)
        self._status()

    def _watch_qemu(self) -> None:
        assert self.qemu is not None
        process = self.qemu.process

        async def watch() -> None:
            await process.wait()
            if self.qemu is not None and self.qemu.process is process:
                self.events.put_nowait(Event("qemu"))

        self._watcher = asyncio.create_task(watch())

    async def _stop_qemu(self) -> int:
        qemu, self.qemu = self.qemu, None
        return await qemu.quit() if qemu is not None else 0

    def _status(self) -> None:
        if self.saved:
            text = "saved, QEMU stopped" if self.qemu is None else "saved, guest stopped"
        else:
            text = "running" if self.qemu is not None else "off"
        joined = f", in session {self.options.session}" if self.session else ", no session"
        self.notifier.notify(f"STATUS={text}{joined}")
