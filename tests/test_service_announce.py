"""What the service announces to the bus edge, driven in-process: a real journal, vault
and simulated backend, and the bus edge's real session objects on a bus that is never
connected (exports and signals are bookkeeping until a connection sends them)."""

import asyncio
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from liveupdated.backends.simulated import SimulatedBackend
from liveupdated.bus.session import SessionObjects
from liveupdated.core.names import session_path
from liveupdated.core.orchestrator import Caller, Orchestrator
from liveupdated.journal import Journal
from liveupdated.sandbox import Notifications
from liveupdated.service import LiveUpdate
from liveupdated.systemd import Notifier
from liveupdated.vault import Vault


def service_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               store: Notifications) -> LiveUpdate:
    monkeypatch.setenv("NOTIFY_SOCKET", str(store.path))  # the stand-in fd store
    journal, records, _ = Journal.open(tmp_path / "journal")
    core = Orchestrator()
    for record in records:
        core.apply(record)
    notifier = Notifier()
    return LiveUpdate(core, journal, Vault(notifier), SimulatedBackend(tmp_path / "area"),
                      notifier, freeze_timeout=1.0)


async def test_a_session_recreated_after_its_creator_left_is_exported_once_and_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """X creates 1000-s and leaves before the creation is durable (its session is
    dropped at once); Y, of the same uid, creates 1000-s again. X's creation must not
    export Y's session: Y's own does, once, and Y is answered."""
    store = Notifications()
    service = service_in(tmp_path, monkeypatch, store)
    objects = SessionObjects(MessageBus(bus_address="unix:path=/nonexistent"), service,
                             None)  # type: ignore[arg-type]  # no caller is looked up
    service.listeners.session_added = objects.add
    service.listeners.session_removed = objects.remove
    x = Caller(uid=1000, unit="", client=":1.10", admin=False)
    y = Caller(uid=1000, unit="", client=":1.11", admin=False)
    first = asyncio.ensure_future(service.create_session(x, "1000-s"))
    await asyncio.sleep(0)  # decided; its flush is under way
    assert "1000-s" in service.core.sessions and not first.done()
    service.client_left(x.client)
    second = asyncio.ensure_future(service.create_session(y, "1000-s"))
    try:
        answers = list(await asyncio.gather(first, second, return_exceptions=True))
        assert answers == ["1000-s", "1000-s"]
        assert service.core.sessions["1000-s"].client == y.client
        assert objects.name_at(session_path("1000-s")) == "1000-s"
    finally:
        await service.journal.aclose()
        service.notifier.close()
        store.close()
