"""The Freeze barrier over a real bus: DelayFreeze / ReadyForFreeze, StateChanged.

Freeze waits for every session that asked, up to --freeze-timeout, then fails with
Timeout naming the laggards and the state stays PREPARED; StateChanged tells the VMMs
when to quiesce.
"""

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import Timeout, WrongState
from liveupdated.core.orchestrator import Orchestrator
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd
from tests.other_uid import OtherUid, digest
from tests.rules_support import NOBODY, Host, Signals


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


async def states(client: Client) -> dict[str, str]:
    return {s.name: s.state for s in await client.list_sessions()}


async def test_freeze_waits_for_every_session_that_asked(host: Host) -> None:
    await host.start("--freeze-timeout", "60")
    async with (
        await host.connect() as root,
        await host.connect() as vmm,
        OtherUid(host.address, NOBODY) as nobody,
    ):
        a = await vmm.create_session("vm-a")
        await a.delay_freeze(True)
        await nobody.call("create_session", name="65534-vm-b")
        await nobody.call("delay_freeze", session="65534-vm-b", enable=True)
        await vmm.create_session("vm-plain")
        undecided = await vmm.create_session("vm-undecided")
        await undecided.delay_freeze(True)
        await undecided.delay_freeze(False)
        await root.prepare()

        freeze = asyncio.create_task(root.freeze())
        await a.ready_for_freeze()
        assert await root.state() == "prepared"
        assert (await states(root))["vm-a"] == "ready"
        assert not freeze.done()
        await nobody.call("ready_for_freeze", session="65534-vm-b")
        async with asyncio.timeout(30):
            await freeze
        assert await root.state() == "frozen"
        assert set((await states(root)).values()) == {"frozen"}


async def test_freeze_times_out_naming_the_laggards_and_stays_prepared(host: Host) -> None:
    timeout = 0.5
    await host.start("--freeze-timeout", str(timeout))
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        ready = await root.create_session("vm-ready")
        await ready.delay_freeze(True)
        late = await root.create_session("vm-late-1")
        await late.delay_freeze(True)
        await nobody.call("create_session", name="65534-vm-late-2")
        await nobody.call("delay_freeze", session="65534-vm-late-2", enable=True)
        await root.create_session("vm-plain")
        await root.prepare()
        await ready.ready_for_freeze()

        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Timeout) as failure:
            await root.freeze()
        waited = loop.time() - started
        message = str(failure.value)
        assert "vm-late-1" in message and "65534-vm-late-2" in message
        assert "vm-ready" not in message and "vm-plain" not in message
        assert timeout <= waited < timeout + 5, f"Freeze gave up after {waited:.2f}s"
        assert await root.state() == "prepared"
        assert host.handover_files() == []
        assert (await states(root))["vm-ready"] == "ready"

        await late.ready_for_freeze()
        await nobody.call("ready_for_freeze", session="65534-vm-late-2")
        await root.freeze()
        assert await root.state() == "frozen"


async def test_state_changed_tells_vmms_when_to_quiesce(host: Host) -> None:
    """A VMM that only follows the signals gets through Freeze without any polling."""
    await host.start("--freeze-timeout", "60")
    async with await host.connect() as root, await host.connect() as vmm:
        signals = await Signals(vmm).subscribe()
        session = await vmm.create_session("vm")
        ram = make_memfd(1 << 16, b"running")
        await session.preserve_fd("ram", ram)
        await session.delay_freeze(True)
        final = b"final state written while quiescing"

        async def quiesce() -> None:
            await signals.wait_for(lambda s: ("normal", "prepared") in s.state_changes(),
                                   "StateChanged normal -> prepared")
            os.pwrite(ram, final, 0)
            await session.ready_for_freeze()

        vmm_task = asyncio.create_task(quiesce())
        await root.prepare()
        await root.freeze()
        # Written before ReadyForFreeze was sent, which Freeze waited for. (The task's
        # own end is seen on another connection: in no set order with Freeze's answer.)
        assert os.pread(ram, len(final), 0) == final
        async with asyncio.timeout(10):
            await vmm_task
        await signals.wait_for(lambda s: ("prepared", "frozen") in s.state_changes(),
                               "StateChanged prepared -> frozen")
        assert signals.state_changes() == [("normal", "prepared"), ("prepared", "frozen")]
        assert signals.state_properties() == ["prepared", "frozen"]
        want = digest(ram)
        os.close(ram)
        await host.reboot(root)

    async with await host.connect() as vmm:
        session = await vmm.retrieve_session("vm")
        fd = await session.retrieve_fd("ram")
        assert digest(fd) == want, "the state written before ReadyForFreeze was not carried"
        os.close(fd)


def journaled_states(host: Host) -> dict[str, str]:
    """Session states as a restarted daemon would rebuild them from the journal."""
    core = Orchestrator()
    for record in host.journal_records():
        core.apply(record)
    return {name: core.session_state(s) for name, s in core.sessions.items()}


async def test_ready_for_freeze_sent_with_prepare_is_journaled(host: Host) -> None:
    """A VMM that answers Prepare at once: whatever the daemon acknowledged is durable,
    so a restart keeps it. (One connection sends both calls, so that they reach the
    daemon in this order; the attempt is repeated because the daemon may read them
    apart.)"""
    await host.start("--freeze-timeout", "0.3")
    async with await host.connect() as root:
        session = await root.create_session("vm")
        await session.delay_freeze(True)
        for attempt in range(20):
            _, ready = await asyncio.gather(
                root.prepare(), session.ready_for_freeze(), return_exceptions=True
            )
            if isinstance(ready, WrongState):  # refused until Prepare is done: say it again
                await session.ready_for_freeze()
            elif isinstance(ready, BaseException):
                raise ready
            assert await states(root) == {"vm": "ready"}
            assert journaled_states(host) == {"vm": "ready"}, (
                f"attempt {attempt}: an acknowledged ReadyForFreeze is not in the journal "
                "(a restart would forget it and Freeze would wait for this VMM again)"
            )
            await root.cancel()
        await root.prepare()
        await session.ready_for_freeze()
        await host.restart(crash=True)
        assert await states(root) == {"vm": "ready"}
        await root.freeze()
        assert await root.state() == "frozen"


async def test_cancel_interrupts_a_waiting_freeze(host: Host) -> None:
    await host.start("--freeze-timeout", "60")
    async with await host.connect() as root, await host.connect() as other_admin:
        late = await root.create_session("vm-late")
        await late.delay_freeze(True)
        await root.prepare()
        freeze = asyncio.create_task(root.freeze())
        assert await root.state() == "prepared"
        await other_admin.cancel()
        with pytest.raises(WrongState):
            async with asyncio.timeout(30):
                await freeze
        assert await root.state() == "normal"
        assert (await states(root)) == {"vm-late": "open"}


async def test_barrier_calls_only_in_their_state(host: Host) -> None:
    await host.start()
    async with await host.connect() as root:
        session: SessionClient = await root.create_session("vm")
        with pytest.raises(WrongState, match="prepared"):
            await session.ready_for_freeze()
        await root.prepare()
        with pytest.raises(WrongState, match="normal"):
            await session.delay_freeze(True)
        await root.freeze()
        with pytest.raises(WrongState):
            await session.ready_for_freeze()
        assert await root.state() == "frozen"


async def test_freeze_started_tells_the_vmms_that_delay_it_when_to_quiesce(
    client: Client,
) -> None:
    """A VMM stops its guest on FreezeStarted (not on Prepare: the brownout keeps VMs
    running) and answers ReadyForFreeze; Freeze then completes."""
    session = await client.create_session("vm")
    fd = make_memfd(4096, b"ram")
    await session.preserve_fd("ram", fd)
    await session.delay_freeze(True)
    started: list[str] = []
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_signal(msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.member == "FreezeStarted":
            started.append(msg.path or "")
            if not ready.done():
                ready.set_result(None)
        return False

    client.bus.add_message_handler(on_signal)
    await client.add_match(
        "type='signal',sender='org.liveupdate1',interface='org.liveupdate1.Manager',"
        "member='FreezeStarted'"
    )
    await client.prepare()
    assert started == []  # Prepare alone does not stop a VM
    freezing = asyncio.ensure_future(client.freeze())
    async with asyncio.timeout(10):
        await ready
    assert not freezing.done()
    await session.ready_for_freeze()
    await freezing
    assert started == ["/org/liveupdate1"]
    await client.cancel()
    await session.delay_freeze(False)
    await client.prepare()
    await client.freeze()  # nobody delays it: no signal, nothing to wait for
    assert started == ["/org/liveupdate1"]
    os.close(fd)
