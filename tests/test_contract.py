"""The D-Bus contract as outside clients see it: busctl, gdbus, introspection, errors."""

import asyncio
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import InvalidArgument, TokenExists, UnsupportedFd, WrongState
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import DaemonFactory, make_memfd, open_fds

DBUS_DIR = Path(__file__).parent.parent / "dbus"


def busctl(bus: PrivateBus, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["busctl", f"--address={bus.address}", *args],
        capture_output=True, text=True, check=check, timeout=30,
    )


def manager_call(bus: PrivateBus, method: str, *args: str) -> str:
    return busctl(
        bus, "call", "org.liveupdate1", "/org/liveupdate1", "org.liveupdate1.Manager", method,
        *args,
    ).stdout.strip()


def session_call(bus: PrivateBus, path: str, method: str, *args: str) -> str:
    return busctl(
        bus, "call", "org.liveupdate1", path, "org.liveupdate1.Session", method, *args
    ).stdout.strip()


def interface_shape(root: ET.Element, name: str) -> list[tuple[str, ...]]:
    """Members of one interface as comparable tuples, ignoring comments and formatting."""
    (iface,) = [i for i in root.iter("interface") if i.get("name") == name]
    shape: list[tuple[str, ...]] = []
    for member in iface:
        args = tuple(
            f"{a.get('name', '')}:{a.get('direction', 'out')}:{a.get('type')}"
            for a in member.iter("arg")
        )
        shape.append((member.tag, member.get("name", ""), member.get("type", ""),
                      member.get("access", ""), *args))
    return sorted(shape)


@pytest.mark.parametrize(
    ("interface", "path_of"),
    [("org.liveupdate1.Manager", lambda s: "/org/liveupdate1"),
     ("org.liveupdate1.Session", lambda s: s)],
)
async def test_exported_interfaces_equal_the_committed_introspection(
    client: Client, interface: str, path_of: object
) -> None:
    session = await client.create_session("vm")
    path = path_of(session.path)  # type: ignore[operator]
    (live,) = await client.call(path, "org.freedesktop.DBus.Introspectable", "Introspect")
    committed = ET.parse(DBUS_DIR / f"{interface}.xml").getroot()
    assert interface_shape(ET.fromstring(live), interface) == interface_shape(committed, interface)


async def test_busctl_drives_every_method_without_an_fd(
    bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    old = start_daemon()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm")
        for token in ("ram", "extra"):
            fd = make_memfd(8192, token.encode())
            await session.preserve_fd(token, fd)
            os.close(fd)
        path = session.path
        assert manager_call(bus, "CreateSession", "s", "shortlived") == (
            'o "/org/liveupdate1/session/shortlived"'
        )
        assert '"vm"' in manager_call(bus, "ListSessions")
        assert busctl(bus, "get-property", "org.liveupdate1", "/org/liveupdate1",
                      "org.liveupdate1.Manager", "State").stdout.strip() == 's "normal"'
        props = busctl(bus, "introspect", "org.liveupdate1", "/org/liveupdate1").stdout
        for prop in ("Backend", "BootId", "Version", "LastBlackoutUSec"):
            assert f".{prop}" in props
        assert session_call(bus, path, "ListFds").startswith("a(ssast) 2")
        session_call(bus, path, "UnpreserveFd", "s", "extra")
        session_call(bus, path, "DelayFreeze", "b", "true")
        manager_call(bus, "Prepare")
        session_call(bus, path, "ReadyForFreeze")
        manager_call(bus, "Freeze")
        manager_call(bus, "Cancel")
        manager_call(bus, "Prepare")
        session_call(bus, path, "ReadyForFreeze")
        manager_call(bus, "Freeze")
        manager_call(bus, "Reboot")
    assert old.wait() == 0
    start_daemon()
    assert manager_call(bus, "RetrieveSession", "s", "vm") == f'o "{path}"'
    session_call(bus, path, "Finish")
    manager_call(bus, "Finish")
    manager_call(bus, "CreateSession", "s", "closing")  # dropped again when busctl leaves
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("to-close")
        session_call(bus, session.path, "Close")
        assert await vmm.list_sessions() == []


async def test_errors_carry_contract_names_to_another_library(client: Client,
                                                               bus: PrivateBus) -> None:
    result = subprocess.run(
        ["gdbus", "call", "--address", bus.address, "--dest", "org.liveupdate1",
         "--object-path", "/org/liveupdate1", "--method",
         "org.liveupdate1.Manager.CreateSession", "bad name!"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode != 0
    assert "org.liveupdate1.Error.InvalidArgument" in result.stderr
    with pytest.raises(InvalidArgument, match=r"\[A-Za-z0-9_.-\]"):
        await client.create_session("bad name!")
    with pytest.raises(WrongState, match="RetrieveSession is allowed in state updated"):
        await client.retrieve_session("nope")


async def test_gdbus_can_hand_over_an_fd(client: Client, bus: PrivateBus,
                                         tmp_path: Path) -> None:
    session = await client.create_session("vm")
    fd = make_memfd(4096, b"from gdbus")
    command = (
        f"exec gdbus call --address '{bus.address}' --dest org.liveupdate1 "
        f"--object-path {session.path} --method org.liveupdate1.Session.PreserveFd "
        f"ram 'handle 3' '@as []' 3<&{fd}"
    )
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            timeout=30, check=False, pass_fds=[fd])
    assert result.returncode == 0, result.stderr
    back = await session.retrieve_fd("ram")
    assert os.pread(back, 10, 0) == b"from gdbus"
    for f in (fd, back):
        os.close(f)


async def test_preserve_fd_answers_alike_before_and_after_the_caller_is_known(
    client: Client, bus: PrivateBus
) -> None:
    """A connection's first call is answered by the Session object (its credentials are
    not known yet), later PreserveFds by the fast path: the same answers either way."""
    session = await client.create_session("vm")
    fd = make_memfd(4096, b"guest")
    await session.preserve_fd("ram", fd)
    async with await Client.connect(bus.address) as other:
        as_other = SessionClient(other, "vm", session.path)
        for _ in range(2):
            with pytest.raises(TokenExists, match="session 'vm' already holds token 'ram'"):
                await as_other.preserve_fd("ram", fd)
        with pytest.raises(InvalidArgument, match="requires of 'kvm' lists a token twice"):
            await as_other.preserve_fd("kvm", fd, ["ram", "ram"])
        await as_other.preserve_fd("rom", fd, ["ram"])
    assert [(f.token, f.requires) for f in await session.list_fds()] == [
        ("ram", []), ("rom", ["ram"])
    ]
    os.close(fd)


async def test_calls_of_one_connection_are_decided_in_the_order_sent(client: Client) -> None:
    """UnpreserveFd then PreserveFd of the same token, sent back to back: the second is
    not decided before the first (it would find the token still held)."""
    session = await client.create_session("vm")
    old, new = make_memfd(4096, b"old"), make_memfd(4096, b"new")
    await session.preserve_fd("ram", old)
    for _ in range(20):
        await asyncio.gather(session.unpreserve_fd("ram"), session.preserve_fd("ram", new))
        await asyncio.gather(session.unpreserve_fd("ram"), session.preserve_fd("ram", old))
    back = await session.retrieve_fd("ram")
    assert os.pread(back, 3, 0) == b"old"
    for fd in (old, new, back):
        os.close(fd)


async def test_rejected_calls_leak_no_fds(client: Client, daemon: DaemonProcess) -> None:
    session = await client.create_session("vm")
    fd = make_memfd()
    await session.preserve_fd("ram", fd)
    r, w = os.pipe()
    baseline = open_fds(daemon.pid)

    def call(path: str, interface: str | None, member: str, signature: str,
             body: list[object], fds: list[int]) -> Message:
        return Message(destination="org.liveupdate1", path=path, interface=interface,
                       member=member, signature=signature, body=body, unix_fds=fds)

    rejected = [
        call("/org/liveupdate1", "org.liveupdate1.Manager", "NoSuchMethod", "h", [0], [fd]),
        call(session.path, "org.liveupdate1.Session", "PreserveFd", "sh", ["x", 0], [fd]),
        call("/org/liveupdate1/session/ghost", "org.liveupdate1.Session", "PreserveFd",
             "shas", ["x", 0, []], [fd]),
        call(session.path, "org.liveupdate1.Session", "PreserveFd", "shas", ["x", 5, []], [fd]),
        call(session.path, "org.liveupdate1.Session", "PreserveFd", "shas", ["ram", 0, []],
             [fd]),
        call(session.path, "org.liveupdate1.Session", "PreserveFd", "shas", ["p", 0, []], [r]),
        call(session.path, "org.liveupdate1.Session", "PreserveFd", "shas", ["two", 0, []],
             [fd, r]),
        call(session.path, "org.liveupdate1.Session", "PreserveFd", "shas", ["bad/tok", 0, []],
             [fd]),
    ]
    for _ in range(25):
        replies = await asyncio.gather(*(client.bus.call(m) for m in rejected))
        for reply in replies[:-2]:
            assert reply is not None and reply.message_type is MessageType.ERROR
        await client.call(session.path, "org.liveupdate1.Session", "UnpreserveFd", "s", ["two"])
    assert open_fds(daemon.pid) == baseline
    for f in (fd, r, w):
        os.close(f)


async def test_retrieved_dups_are_closed_once_sent(client: Client,
                                                   daemon: DaemonProcess) -> None:
    session = await client.create_session("vm")
    fd = make_memfd()
    await session.preserve_fd("ram", fd)
    baseline = open_fds(daemon.pid)
    got = await asyncio.gather(*(session.retrieve_fd("ram") for _ in range(100)))
    for f in got:
        os.close(f)
    await client.state()  # a later round trip: every earlier reply is on the wire
    assert open_fds(daemon.pid) == baseline
    os.close(fd)


async def test_held_fds_are_close_on_exec(client: Client, daemon: DaemonProcess) -> None:
    session = await client.create_session("vm")
    fd = make_memfd()
    os.set_inheritable(fd, True)
    await session.preserve_fd("ram", fd)
    memfds = []
    for entry in os.listdir(f"/proc/{daemon.pid}/fd"):
        if os.readlink(f"/proc/{daemon.pid}/fd/{entry}").startswith("/memfd:ram"):
            flags = Path(f"/proc/{daemon.pid}/fdinfo/{entry}").read_text().split()[3]
            memfds.append(int(flags, 8) & os.O_CLOEXEC)
    assert memfds and all(memfds)
    os.close(fd)


async def test_unsupported_fds_are_named(client: Client, tmp_path: Path) -> None:
    session = await client.create_session("vm")
    r, w = os.pipe()
    with pytest.raises(UnsupportedFd, match="a pipe, not a memfd; supported: memfd"):
        await session.preserve_fd("p", r)
    (tmp_path / "f").write_bytes(b"x")
    regular = os.open(tmp_path / "f", os.O_RDONLY)
    with pytest.raises(UnsupportedFd, match="regular file"):
        await session.preserve_fd("f", regular)
    assert await session.list_fds() == []
    for f in (r, w, regular):
        os.close(f)


async def test_state_changes_are_signalled(client: Client) -> None:
    seen: asyncio.Queue[tuple[str, list[object]]] = asyncio.Queue()

    def on_message(msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.member in (
            "StateChanged", "PropertiesChanged"
        ):
            seen.put_nowait((msg.member, list(msg.body)))
        return False

    client.bus.add_message_handler(on_message)
    await client.add_match("type='signal',sender='org.liveupdate1'")
    await client.prepare()
    signals: dict[str, list[object]] = {}
    while len(signals) < 2:
        member, body = await asyncio.wait_for(seen.get(), 10)
        signals[member] = body
    assert signals["StateChanged"] == ["normal", "prepared"]
    interface, changed, _ = signals["PropertiesChanged"]
    assert interface == "org.liveupdate1.Manager"
    assert changed["State"].value == "prepared"  # type: ignore[index]
    with pytest.raises(WrongState, match="allowed in state normal, not prepared"):
        await client.create_session("late")


async def test_the_daemon_exits_non_zero_when_it_loses_the_bus(
    bus: PrivateBus, daemon: DaemonProcess
) -> None:
    bus.stop()
    assert daemon.wait(30) == 1
