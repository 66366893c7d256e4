"""A client that floods the daemon with calls and never reads the answers costs only
itself: the daemon stays on the bus, keeps serving everyone else, and holds no more fds.

The flooding client is hand-rolled on a raw socket (connected as uid 65534), so that it
can send hundreds of calls without reading a single reply.
"""

import os
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller

from liveupdated import privatebus
from liveupdated.bus import BUS_NAME, MANAGER_INTERFACE, SESSION_INTERFACE
from liveupdated.bus.connection import MAX_CALLS_IN_FLIGHT
from liveupdated.client import Client
from liveupdated.core.names import MANAGER_PATH, session_path
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import make_memfd, open_fds

NOBODY = 65534
QUOTA = "org.liveupdate1.Error.QuotaExceeded"
TOKEN_EXISTS = "org.liveupdate1.Error.TokenExists"
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"  # what the bus says when the daemon left it
# The longest names make ListSessions answers big: 64 of them are ~11 KiB per answer.
LONG_NAMES = [f"{NOBODY}-vm-{i:02}-" + "x" * 51 for i in range(64)]


def connect_as(uid: int, path: str) -> socket.socket:
    """A socket connected to `path` by a child process running as `uid`: the bus takes
    the peer credentials of the connect(), so the connection is that uid's."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            socket.send_fds(child, [b"s"], [sock.fileno()])
        finally:
            os._exit(0)
    child.close()
    os.waitpid(pid, 0)
    with parent:
        _, fds, _, _ = socket.recv_fds(parent, 1, 1)
    assert fds, f"uid {uid} could not connect to {path}"
    return socket.socket(fileno=fds[0])


class RawClient:
    """A D-Bus client that sends when told and reads only when told."""

    def __init__(self, sock: socket.socket, uid: int) -> None:
        self.sock = sock
        sock.settimeout(60)
        sock.sendall(b"\0AUTH EXTERNAL " + str(uid).encode().hex().encode() + b"\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            line += sock.recv(1)
        assert line.startswith(b"OK "), line
        sock.sendall(b"NEGOTIATE_UNIX_FD\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            line += sock.recv(1)
        assert line.startswith(b"AGREE_UNIX_FD"), line
        sock.sendall(b"BEGIN\r\n")
        self._serial = 0
        self.send("/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello",
                  destination="org.freedesktop.DBus")
        self.unique_name = self.replies(1)[0].body[0]

    @classmethod
    def connect_as(cls, uid: int, bus: PrivateBus) -> "RawClient":
        return cls(connect_as(uid, str(bus.socket)), uid)

    def send(self, path: str, interface: str, member: str, signature: str = "",
             body: Sequence[Any] = (), fds: Sequence[int] = (),
             destination: str = BUS_NAME) -> int:
        self._serial += 1
        msg = Message(destination=destination, path=path, interface=interface,
                      member=member, signature=signature, body=list(body),
                      serial=self._serial, unix_fds=list(fds))
        data = bytes(msg._marshall(True))
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(
                b"".join(fd.to_bytes(4, "little", signed=True) for fd in fds)))])
        else:
            self.sock.sendall(data)
        return self._serial

    def replies(self, count: int) -> list[Message]:
        """The next `count` replies (method returns and errors), in order of arrival."""
        found: list[Message] = []
        while len(found) < count:
            msg = Unmarshaller(sock=self.sock, negotiate_unix_fd=True)
            message = _read_one(msg)
            for fd in message.unix_fds:
                os.close(fd)
            if message.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR):
                found.append(message)
            elif message.member == "Ping" and message.interface == "org.freedesktop.DBus.Peer":
                self.answer(message)  # as every D-Bus library does, when it reads
        return found

    def answer(self, call: Message) -> None:
        self._serial += 1
        reply = Message.new_method_return(call)
        reply.serial = self._serial
        self.sock.sendall(bytes(reply._marshall(True)))

    def close(self) -> None:
        self.sock.close()


def _read_one(unmarshaller: Unmarshaller) -> Message:
    """One whole message from a blocking socket (the unmarshaller reads as it needs)."""
    while True:
        try:
            message = unmarshaller.unmarshall()
        except BlockingIOError:
            continue
        if message is not None:
            return message


@pytest.fixture
def nobody(bus: PrivateBus, daemon: DaemonProcess) -> Iterator[RawClient]:
    raw = RawClient.connect_as(NOBODY, bus)
    yield raw
    raw.close()


def outcome(reply: Message) -> str:
    """"ok" for a method return, else the error's name."""
    if reply.message_type is MessageType.ERROR:
        return reply.error_name or "?"
    return "ok"


def create_sessions(raw: RawClient, names: Sequence[str]) -> None:
    for start in range(0, len(names), 16):
        batch = names[start:start + 16]
        for name in batch:
            raw.send(MANAGER_PATH, MANAGER_INTERFACE, "CreateSession", "s", [name])
        assert [outcome(r) for r in raw.replies(len(batch))] == ["ok"] * len(batch)


async def test_a_burst_of_big_answers_does_not_cost_the_daemon_its_bus(
    bus: PrivateBus, daemon: DaemonProcess, nobody: RawClient
) -> None:
    """128 ListSessions of 64 long names each (~1.4 MiB of answers, far more than a
    socket buffer) sent without reading: the daemon used to die of EAGAIN."""
    create_sessions(nobody, LONG_NAMES)
    for _ in range(128):  # dbus-daemon's own bound on calls awaiting replies
        nobody.send(MANAGER_PATH, MANAGER_INTERFACE, "ListSessions")
    replies = nobody.replies(128)
    outcomes = Counter(outcome(r) for r in replies)
    assert set(outcomes) <= {"ok", QUOTA}, outcomes
    assert outcomes["ok"] >= MAX_CALLS_IN_FLIGHT, outcomes
    assert all(len(r.body[0]) == 64 for r in replies if outcome(r) == "ok")
    assert daemon.process is not None and daemon.process.poll() is None
    async with await Client.connect(bus.address) as root:
        assert len(await root.list_sessions()) == 64


@pytest.fixture
def session_like_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    """A private bus that lets a connection await as many replies as a session bus does
    (session.conf: 50000; the system bus and the tests' bus: 128), so that all calls of
    a flood reach the daemon."""
    limit = '<limit name="max_replies_per_connection">50000</limit>'
    monkeypatch.setattr(privatebus, "CONFIG", privatebus.CONFIG.replace("<auth>", limit + "<auth>"))
    directory = Path(tempfile.mkdtemp(prefix="lud-bus-"))
    with PrivateBus(directory) as private_bus:
        yield private_bus
    shutil.rmtree(directory, ignore_errors=True)


class TestOnABusThatAllowsMoreCalls:
    @pytest.fixture
    def bus(self, session_like_bus: PrivateBus) -> PrivateBus:
        return session_like_bus

    async def test_a_client_pipelining_500_calls_costs_only_itself(
        self, bus: PrivateBus, daemon: DaemonProcess, nobody: RawClient, client: Client
    ) -> None:
        await _pipelining_500_calls_costs_only_itself(daemon, nobody, client)


async def _pipelining_500_calls_costs_only_itself(
    daemon: DaemonProcess, nobody: RawClient, client: Client
) -> None:
    """500 calls sent at once, never read while a second client works: the second gets
    normal answers, the flooder QuotaExceeded for calls over the bound and answers for
    the rest, later; the fds of refused calls are closed (the daemon's fd count is flat)."""
    create_sessions(nobody, LONG_NAMES)
    vm = session_path(LONG_NAMES[0])
    fd = make_memfd(4096)
    try:
        nobody.send(vm, SESSION_INTERFACE, "PreserveFd", "shas", ["t", 0, []], fds=[fd])
        assert outcome(nobody.replies(1)[0]) == "ok"
        await client.list_sessions()  # the daemon is idle again
        fds_before = open_fds(daemon.pid)
        for i in range(500):
            if i % 4:
                nobody.send(MANAGER_PATH, MANAGER_INTERFACE, "ListSessions")
            else:  # the fast path answers it (TokenExists) or the quota refuses it
                nobody.send(vm, SESSION_INTERFACE, "PreserveFd", "shas", ["t", 0, []],
                            fds=[fd])
    finally:
        os.close(fd)

    mine = await client.create_session("root-vm")
    for _ in range(20):
        assert len(await client.list_sessions()) == 65
        assert (await mine.properties())["Name"] == "root-vm"
        assert await client.state() == "normal"

    outcomes = Counter(outcome(r) for r in nobody.replies(500))
    assert set(outcomes) <= {"ok", QUOTA, TOKEN_EXISTS}, outcomes
    assert outcomes[QUOTA] and outcomes["ok"] and outcomes[TOKEN_EXISTS], outcomes
    nobody.send(MANAGER_PATH, MANAGER_INTERFACE, "ListSessions")
    (later,) = nobody.replies(1)
    assert outcome(later) == "ok" and len(later.body[0]) == 64
    await client.list_sessions()
    assert open_fds(daemon.pid) == fds_before
    assert daemon.process is not None and daemon.process.poll() is None
