"""org.liveupdate1.Manager: sessions and the host's update, on /org/liveupdate1."""

import asyncio
import dataclasses
from typing import Annotated, Any

from dbus_fast import Variant
from dbus_fast.annotations import DBusObjectPath, DBusStr, DBusUInt64, DBusUnixFd
from dbus_fast.annotations import DBusSignature as Sig
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

import liveupdated
from liveupdated.bus import MANAGER_INTERFACE
from liveupdated.bus.callers import CURRENT_MESSAGE, Callers
from liveupdated.bus.connection import FdOwningBus
from liveupdated.bus.errors import contract
from liveupdated.bus.polkit import DROP_SESSION, MANAGE, authorize
from liveupdated.config import Config
from liveupdated.core import preflight
from liveupdated.core.names import session_path
from liveupdated.core.orchestrator import Caller
from liveupdated.core.records import UpdateCycle
from liveupdated.fds import memfd
from liveupdated.service import LiveUpdate
from liveupdated.systemd import boot_id

SessionList = Annotated[list[list[Any]], Sig("a(sousu)")]
QuarantineList = Annotated[list[list[Any]], Sig("a(sssts)")]
HistoryList = Annotated[list[dict[str, Variant]], Sig("aa{sv}")]
CheckList = Annotated[list[list[str]], Sig("a(sss)")]


def _cycle_fields(cycle: UpdateCycle) -> dict[str, Variant]:
    """An update cycle as a{sv}: times in usec (t), uids (i: -1 unknown), counts (u)."""
    fields: dict[str, Variant] = {}
    for f in dataclasses.fields(cycle):
        value = getattr(cycle, f.name)
        if isinstance(value, str):
            fields[f.name] = Variant("s", value)
        elif isinstance(value, tuple):
            fields[f.name] = Variant("as", list(value))
        elif f.name.endswith("_by"):
            fields[f.name] = Variant("i", value)
        elif f.name.endswith("_usec") or f.name == "bytes_carried":
            fields[f.name] = Variant("t", value)
        else:
            fields[f.name] = Variant("u", value)
    return fields


class Manager(ServiceInterface):
    def __init__(self, service: LiveUpdate, callers: Callers, bus: FdOwningBus,
                 config: Config | None = None) -> None:
        super().__init__(MANAGER_INTERFACE)
        self._service = service
        self._config = config or Config()
        self._callers = callers
        self._bus = bus
        self._boot_id = boot_id()

    async def _host_caller(self, action: str) -> Caller:
        """The caller of a host command: root, or whom polkit allows `action`."""
        return await authorize(self._bus, await self._callers.current(), action)

    @dbus_method(name="CreateSession")
    @contract
    async def create_session(self, name: DBusStr) -> DBusObjectPath:
        caller = await self._callers.current()
        return session_path(await self._service.create_session(caller, name))

    @dbus_method(name="RetrieveSession")
    @contract
    async def retrieve_session(self, name: DBusStr) -> DBusObjectPath:
        caller = await self._callers.current()
        return session_path(self._service.retrieve_session(caller, name).name)

    @dbus_method(name="ListSessions")
    @contract
    async def list_sessions(self) -> SessionList:
        caller = await self._callers.current()
        core = self._service.core
        return [
            [s.name, session_path(s.name), s.uid, core.session_state(s), len(s.fds)]
            for s in sorted(core.visible_sessions(caller), key=lambda s: s.name)
        ]

    @dbus_method(name="Prepare")
    @contract
    async def prepare(self) -> None:
        await self._service.prepare(await self._host_caller(MANAGE))

    @dbus_method(name="Freeze")
    @contract
    async def freeze(self) -> None:
        await self._service.freeze(await self._host_caller(MANAGE))

    @dbus_method(name="Cancel")
    @contract
    async def cancel(self) -> None:
        await self._service.cancel(await self._host_caller(MANAGE))

    @dbus_method(name="Reboot")
    @contract
    async def reboot(self) -> None:
        serial = CURRENT_MESSAGE.get().serial
        await self._service.reboot(await self._host_caller(MANAGE))
        self._bus.when_replied(serial, self._service.reboot_requested.set)

    @dbus_method(name="Finish")
    @contract
    async def finish(self) -> None:
        await self._service.finish(await self._host_caller(MANAGE))

    @dbus_method(name="DropSession")
    @contract
    async def drop_session(self, name: DBusStr, reason: DBusStr) -> None:
        await self._service.drop_session(await self._host_caller(DROP_SESSION), name, reason)

    @dbus_method(name="ListQuarantined")
    @contract
    async def list_quarantined(self) -> QuarantineList:
        caller = await self._callers.current()
        return [
            [q.id, q.session, q.token, q.size, q.reason]
            for q in self._service.core.visible_quarantine(caller)
        ]

    @dbus_method(name="RetrieveQuarantined")
    @contract
    async def retrieve_quarantined(self, id: DBusStr) -> DBusUnixFd:  # the wire's arg name
        caller = await self._host_caller(MANAGE)
        return self._service.retrieve_quarantined(caller, id)

    @dbus_method(name="ReleaseQuarantined")
    @contract
    async def release_quarantined(self, id: DBusStr) -> None:  # the wire's arg name
        caller = await self._host_caller(MANAGE)
        await self._service.release_quarantined(caller, id)

    @dbus_method(name="Check")
    @contract
    async def check(self) -> CheckList:
        """The preflight of an update (core/preflight.py); changes nothing."""
        await self._host_caller(MANAGE)
        service = self._service
        held = {k: fd for k, fd in service.vault.items().items()
                if k[0] in service.core.sessions and k[1] in service.core.sessions[k[0]].fds}
        facts = await asyncio.to_thread(
            preflight.gather, service.backend, self._config.resolved_reboot_action(), held,
            memfd.inspect, service.core.storage_problem,
        )
        return [list(item) for item in preflight.verdicts(service.core, facts)]

    @dbus_method(name="GetHistory")
    @contract
    async def get_history(self) -> HistoryList:
        """The last update cycles, oldest first, the one under way last: anyone may read
        them (they name no session)."""
        core = self._service.core
        cycles = [*core.history, *([core.cycle] if core.cycle is not None else [])]
        return [_cycle_fields(cycle) for cycle in cycles]

    @dbus_property(access=PropertyAccess.READ, name="State")
    def state(self) -> DBusStr:
        return self._service.core.phase.value

    @dbus_property(access=PropertyAccess.READ, name="Backend")
    def backend(self) -> DBusStr:
        return self._service.backend.name

    @dbus_property(access=PropertyAccess.READ, name="BootId")
    def boot_id(self) -> DBusStr:
        return self._boot_id

    @dbus_property(access=PropertyAccess.READ, name="Version")
    def version(self) -> DBusStr:
        return liveupdated.__version__

    @dbus_property(access=PropertyAccess.READ, name="LastBlackoutUSec")
    def last_blackout_usec(self) -> DBusUInt64:
        return self._service.core.last_blackout_usec

    @dbus_signal(name="StateChanged")
    def state_changed(self, old: str, new: str) -> Annotated[list[str], Sig("ss")]:
        return [old, new]

    @dbus_signal(name="FreezeStarted")
    def freeze_started(self) -> None:
        """Freeze has begun and waits for the sessions that asked for DelayFreeze: each
        stops its VM, saves what it must and calls ReadyForFreeze."""

    @dbus_signal(name="RebootFailed")
    def reboot_failed(self, reason: str) -> Annotated[str, Sig("s")]:
        """The reboot action failed, or no reboot followed: the state stays frozen, the
        handover is kept; Reboot again or Cancel."""
        return reason

    def announce_phase(self, old: str, new: str) -> None:
        self.state_changed(old, new)
        self.emit_properties_changed(
            {"State": new, "LastBlackoutUSec": self._service.core.last_blackout_usec}
        )
