"""A client that floods the daemon with calls and never reads the answers costs only
itself: the daemon stays on the bus, keeps serving everyone else, and holds no more fds.

The flooding client is hand-rolled on a raw socket (connected as uid 65534), so that it
can send hundreds of calls without reading a single reply.
"""

import os
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller

from liveupdated.bus import BUS_NAME, MANAGER_INTERFACE
from liveupdated.client import Client
from liveupdated.core.names import MANAGER_PATH
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess

NOBODY = 65534
QUOTA = "org.liveupdate1.Error.QuotaExceeded"
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"  # what the bus says when the daemon left it
# The longest names make ListSessions answers big: 64 of them are ~11 KiB per answer.
LONG_NAMES = [f"vm-{i:02}-" + "x" * 57 for i in range(64)]


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
        return found

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
    assert outcomes["ok"] >= 64, outcomes
    assert all(len(r.body[0]) == 64 for r in replies if outcome(r) == "ok")
    assert daemon.process is not None and daemon.process.poll() is None
    async with await Client.connect(bus.address) as root:
        assert len(await root.list_sessions()) == 64
