"""Look-alike signals change nothing: only the connection that owns org.liveupdate1 is
believed, by the client library and the QEMU adapter alike.

On the system bus any user may broadcast a signal with liveupdated's path, interface and
member, and may send one to a single connection (unicast), which reaches it whatever its
match rules. Here uid 65534 and a second root connection do both, at the adapter driven
with the QMP stand-in (tests/fake_qemu.py) and at a library client.

Ordering without sleeps: a spoofer's bus round trip (GetId) after its signals means the
bus has queued them to their destinations; the daemon's own signals caused after that
reach each connection after them, so once the adapter logged the real event, it has
seen (and dropped) the spoofed ones.
"""

import asyncio
import inspect
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller

from liveupdated.bus import BUS_NAME, MANAGER_INTERFACE, driver
from liveupdated.client import Client, daemon_signal_rule
from liveupdated.core.names import MANAGER_PATH
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import Host
from tests.test_bus_limits import NOBODY, RawClient, _read_one
from tests.test_vmm_adapter import Vm, call

ROOT = 0


# (policy, implementation): the tests' open bus, and the system bus's own policy with the
# project's dbus/org.liveupdate1.conf, as on a host (where any user may send signals).
BUSES = [("open", "dbus-daemon"), ("system", "dbus-daemon"), ("system", "dbus-broker")]


def private_bus(policy: str, implementation: str) -> Iterator[PrivateBus]:
    """A PrivateBus of that kind; the test is skipped where it cannot be had."""
    if (policy, implementation) != BUSES[0]:
        if not {"policy", "implementation"} <= set(inspect.signature(PrivateBus).parameters):
            pytest.skip("this PrivateBus has only the open policy and dbus-daemon")
        kind = {"policy": policy, "implementation": implementation}
    else:
        kind = {}
    if shutil.which(implementation) is None:
        pytest.skip(f"{implementation} is not installed")
    directory = Path(tempfile.mkdtemp(prefix="lud-bus-"))
    with PrivateBus(directory, **kind) as started:
        yield started
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=BUSES, ids=["-".join(b) for b in BUSES])
def bus(request: pytest.FixtureRequest) -> Iterator[PrivateBus]:
    yield from private_bus(*request.param)


@pytest.fixture
def vm(bus: PrivateBus, tmp_path: Path) -> Iterator[Vm]:
    machine = Vm(bus, tmp_path)
    yield machine
    machine.close()


class Spoofer:
    """A connection (uid 65534, or another of root's) that sends look-alike signals."""

    def __init__(self, bus: PrivateBus, uid: int) -> None:
        self.raw = RawClient.connect_as(uid, bus)

    def signal(self, member: str, signature: str = "", body: Sequence[Any] = (),
               destination: str | None = None, path: str = MANAGER_PATH,
               interface: str = MANAGER_INTERFACE) -> None:
        self.raw._serial += 1
        msg = Message(message_type=MessageType.SIGNAL, destination=destination, path=path,
                      interface=interface, member=member, signature=signature,
                      body=list(body), serial=self.raw._serial)
        self.raw.sock.sendall(bytes(msg._marshall(True)))

    def everywhere(self, member: str, signature: str = "", body: Sequence[Any] = (),
                   to: Sequence[str] = (), **where: str) -> None:
        """The signal broadcast, and sent to each of `to`; then a bus round trip: the bus
        has queued all of them to their receivers when this returns."""
        self.signal(member, signature, body, **where)
        for name in to:
            self.signal(member, signature, body, destination=name, **where)
        self.raw.send(driver.DRIVER_PATH, driver.DRIVER, "GetId", destination=driver.DRIVER)
        (reply,) = self.raw.replies(1)
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body

    def close(self) -> None:
        self.raw.close()


@pytest.fixture
def spoofers(bus: PrivateBus) -> Iterator[list[Spoofer]]:
    if os.geteuid() != 0:
        pytest.skip("a connection of another uid needs root")
    made = [Spoofer(bus, NOBODY), Spoofer(bus, ROOT)]
    yield made
    for spoofer in made:
        spoofer.close()


async def unique_name_of(bus: PrivateBus, pid: int) -> str:
    """The unique bus name of the connection process `pid` opened."""
    async with await Client.connect(bus.address) as client:
        for _ in range(500):
            (names,) = await driver.call(client.bus, "ListNames")
            for name in names:
                if name.startswith(":"):
                    try:
                        (owner_pid,) = await driver.call(
                            client.bus, "GetConnectionUnixProcessID", "s", name)
                    except LookupError:
                        continue
                    if owner_pid == pid:
                        return str(name)
            await asyncio.sleep(0.01)  # polling for a process to connect, not ordering
    raise AssertionError(f"process {pid} has no bus connection")


def spoof_all(spoofers: list[Spoofer], target: str, daemon_pid: int) -> None:
    """Every look-alike that once moved the adapter: FreezeStarted, StateChanged to
    normal, frozen and updated, and a NameOwnerChanged saying liveupdated left."""
    for spoofer in spoofers:
        for old, new in (("frozen", "normal"), ("prepared", "normal"),
                         ("normal", "frozen"), ("frozen", "updated")):
            spoofer.everywhere("StateChanged", "ss", [old, new], to=[target])
        spoofer.everywhere("FreezeStarted", to=[target])
        spoofer.everywhere("NameOwnerChanged", "sss", [BUS_NAME, f":1.{daemon_pid}", ""],
                           to=[target], path=driver.DRIVER_PATH, interface=driver.DRIVER)


def events(vm: Vm) -> list[tuple[str, str, str]]:
    return [(e["kind"], e.get("old", ""), e.get("new", "")) for e in vm.entries("event")]


async def test_the_adapter_acts_only_on_the_daemons_own_signals(
    host: Host, vm: Vm, spoofers: list[Spoofer]
) -> None:
    host.start_now()
    adapter = vm.start("--log-level", "debug")
    vm.wait("joined")
    target = await unique_name_of(host.bus, adapter.pid)
    vm.wait_count(3)

    # In normal: a spoofed FreezeStarted once stopped and saved the guest.
    spoof_all(spoofers, target, host.pid)
    await call(host.bus, "Prepare")
    vm.wait("event")  # the real StateChanged(normal, prepared), queued after the spoofs
    assert events(vm) == [("state", "normal", "prepared")]
    assert "stop" not in vm.qemu_log.read_text().split()
    assert not vm.entries("liveupdated_gone")

    await call(host.bus, "Freeze")
    vm.wait("qemu_exited")
    last = vm.counts()[-1][0]

    # Frozen: a spoofed StateChanged(frozen, normal) once continued the guest, which
    # then could not be resumed after the reboot.
    spoof_all(spoofers, target, host.pid)
    await rebooted_with(host, vm, adapter)
    real = [("state", "normal", "prepared"), ("freeze", "", ""),
            ("state", "prepared", "frozen")]
    assert events(vm)[:3] == real
    assert not vm.entries("update_cancelled") and not vm.entries("state_unconfirmed")

    second = vm.start()
    vm.wait("resumed")
    seen = vm.wait_count(last + 5)
    assert [n for n, _ in seen] == list(range(1, seen[-1][0] + 1))
    assert vm.serial.read_text().count("BOOT") == 1
    await call(host.bus, "Finish")
    vm.wait("session_finished")
    second.send_signal(signal.SIGTERM)
    assert second.wait(20) == 0


async def rebooted_with(host: Host, vm: Vm, adapter: Any) -> None:
    """The real Reboot: the daemon writes the handover and leaves the bus, the adapter
    (saved, QEMU gone) follows it; the next boot's daemon starts."""
    await call(host.bus, "Reboot")
    assert host.daemons[-1].wait() == 0
    assert adapter.wait(20) == 0
    assert vm.entries("handed_over")
    host.start_now()


async def test_a_cancel_from_the_daemon_still_continues_the_guest(
    host: Host, vm: Vm, spoofers: list[Spoofer]
) -> None:
    """The State read that confirms a continuing StateChanged agrees with a real one."""
    host.start_now()
    adapter = vm.start()
    vm.wait("joined")
    target = await unique_name_of(host.bus, adapter.pid)
    vm.wait_count(1)  # the guest runs: there is a count to carry
    await call(host.bus, "Prepare", "Freeze")
    vm.wait("qemu_exited")
    last = vm.counts()[-1][0]
    spoof_all(spoofers, target, host.pid)
    await call(host.bus, "Cancel")
    vm.wait("resumed")
    seen = vm.wait_count(last + 5)
    assert [n for n, _ in seen] == list(range(1, seen[-1][0] + 1))
    assert len(vm.entries("update_cancelled")) == 1 and adapter.poll() is None


async def test_the_client_library_hears_only_the_daemon(
    bus: PrivateBus, host: Host, spoofers: list[Spoofer]
) -> None:
    host.start_now()
    heard: list[Message] = []
    owners: list[str | None] = []
    got = asyncio.Event()
    owner_changed = asyncio.Event()

    def on_owner(owner: str | None) -> None:
        owners.append(owner)
        owner_changed.set()

    def on_signal(msg: Message) -> None:
        heard.append(msg)
        got.set()

    async with await Client.connect(bus.address) as client:
        await client.follow_daemon(on_signal, on_owner)
        await client.add_match(daemon_signal_rule(MANAGER_INTERFACE, "StateChanged"))
        daemon_name = client.daemon
        assert daemon_name is not None and daemon_name.startswith(":")
        assert owners == [daemon_name]
        me = client.bus.unique_name
        assert me is not None
        spoof_all(spoofers, me, host.pid)
        await client.prepare()
        async with asyncio.timeout(10):
            await got.wait()
        assert [(m.sender, m.member, m.body) for m in heard] == [
            (daemon_name, "StateChanged", ["normal", "prepared"])]
        assert client.daemon == daemon_name and owners == [daemon_name]

        # A restart: the new owner is followed, through the bus's NameOwnerChanged.
        await host.restart()
        async with asyncio.timeout(10):
            while len(owners) < 3:
                owner_changed.clear()
                await owner_changed.wait()
        assert owners[1] is None and owners[2] == client.daemon != daemon_name


def test_no_spoofer_can_pose_as_the_bus(bus: PrivateBus, daemon: DaemonProcess) -> None:
    """The bus sets a message's sender: a spoofer's NameOwnerChanged arrives with its own
    unique name, never org.freedesktop.DBus (what follow_daemon relies on)."""
    if os.geteuid() != 0:
        pytest.skip("a connection of another uid needs root")
    listener = RawClient.connect_as(ROOT, bus)
    spoofer = Spoofer(bus, NOBODY)
    try:
        spoofer.everywhere("NameOwnerChanged", "sss", [BUS_NAME, ":1.1", ""],
                           to=[listener.unique_name], path=driver.DRIVER_PATH,
                           interface=driver.DRIVER)
        msg = _read_one(Unmarshaller(sock=listener.sock, negotiate_unix_fd=True))
        while msg.member == "NameAcquired":  # the bus's own greeting comes first
            msg = _read_one(Unmarshaller(sock=listener.sock, negotiate_unix_fd=True))
        assert msg.member == "NameOwnerChanged" and msg.sender == spoofer.raw.unique_name
    finally:
        spoofer.close()
        listener.close()

