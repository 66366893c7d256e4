"""A call with the wrong signature is answered org.freedesktop.DBus.Error.InvalidArgs
naming the signature the member takes (dbus-fast alone says UnknownMethod), the same
whether or not a session exists at the path, and the fds it carried are closed."""

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from liveupdated.bus.signatures import SIGNATURES
from liveupdated.client import Client
from liveupdated.contract import (
    BUS_NAME,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    SESSION_INTERFACE,
    SESSION_PATH_PREFIX,
)
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import open_fds

INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
DBUS_DIR = Path(__file__).resolve().parent.parent / "dbus"


async def call(bus: MessageBus, path: str, interface: str | None, member: str,
               signature: str, body: list[object], fds: list[int] | None = None) -> Message:
    reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface,
                                   member=member, signature=signature, body=body,
                                   unix_fds=fds or []))
    assert reply is not None
    return reply


def memfd(content: bytes) -> int:
    fd = os.memfd_create("signature-test")
    os.write(fd, content)
    return fd


def test_the_signatures_are_those_of_the_published_introspection() -> None:
    """The table the handler checks against is the exported one; the XML says the same."""
    for interface, table in SIGNATURES.items():
        root = ET.parse(DBUS_DIR / f"{interface}.xml").getroot()
        (node,) = [i for i in root.iter("interface") if i.get("name") == interface]
        published = {
            method.get("name"): "".join(
                arg.get("type", "") for arg in method.iter("arg")
                if arg.get("direction", "in") == "in"
            )
            for method in node.iter("method")
        }
        assert table == published, interface


async def test_a_manager_call_with_the_wrong_signature_names_the_expected_one(
    client: Client,
) -> None:
    reply = await call(client.bus, MANAGER_PATH, MANAGER_INTERFACE, "CreateSession", "u", [7])
    assert reply.message_type is MessageType.ERROR
    assert reply.error_name == INVALID_ARGS
    assert reply.body[0] == (
        'org.liveupdate1.Manager.CreateSession takes the signature "s", not "u"'
    )
    # Too many arguments, and a call without the interface named: the same answer.
    extra = await call(client.bus, MANAGER_PATH, None, "Prepare", "s", ["now"])
    assert extra.error_name == INVALID_ARGS and '"", not "s"' in extra.body[0]
    assert await client.state() == "normal"  # nothing was called


async def test_a_wrong_preserve_fd_is_refused_and_its_fd_closed(
    client: Client, daemon: DaemonProcess
) -> None:
    vm = await client.create_session("vm")
    fd = memfd(b"guest memory")
    try:
        await vm.preserve_fd("warmup", fd)  # the daemon's own fds settle first
        before = open_fds(daemon.pid)
        for attempt in range(40):
            reply = await call(client.bus, vm.path, SESSION_INTERFACE, "PreserveFd", "sh",
                               [f"t{attempt}", 0], [fd])
            assert reply.error_name == INVALID_ARGS
            assert '"shas", not "sh"' in reply.body[0]
        assert open_fds(daemon.pid) == before
        assert [info.token for info in await vm.list_fds()] == ["warmup"]
    finally:
        os.close(fd)


async def test_no_answer_is_sent_when_none_is_expected_and_the_fd_is_still_closed(
    client: Client, daemon: DaemonProcess
) -> None:
    vm = await client.create_session("vm")
    fd = memfd(b"x")
    try:
        before = open_fds(daemon.pid)
        for _ in range(20):
            await client.bus.send(Message(
                destination=BUS_NAME, path=vm.path, interface=SESSION_INTERFACE,
                member="PreserveFd", signature="h", body=[0], unix_fds=[fd],
                flags=MessageFlag.NO_REPLY_EXPECTED))
        # A call answered after them: the daemon has read and handled the 20 before it.
        assert [info.token for info in await vm.list_fds()] == []
        assert open_fds(daemon.pid) == before
    finally:
        os.close(fd)


async def test_the_answer_does_not_tell_whether_a_session_exists(client: Client) -> None:
    vm = await client.create_session("vm")
    missing = SESSION_PATH_PREFIX + "no_2dsuch"
    answers = [
        await call(client.bus, path, SESSION_INTERFACE, "UnpreserveFd", "u", [1])
        for path in (vm.path, missing)
    ]
    assert [a.error_name for a in answers] == [INVALID_ARGS, INVALID_ARGS]
    assert answers[0].body == answers[1].body
    # The right signature on the missing session is still NoSuchSession.
    right = await call(client.bus, missing, SESSION_INTERFACE, "UnpreserveFd", "s", ["t"])
    assert right.error_name == "org.liveupdate1.Error.NoSuchSession"


async def test_unknown_members_and_other_interfaces_are_left_to_dbus_fast(
    client: Client,
) -> None:
    unknown = await call(client.bus, MANAGER_PATH, MANAGER_INTERFACE, "Explode", "s", ["x"])
    assert unknown.error_name == "org.freedesktop.DBus.Error.UnknownMethod"
    ping = await call(client.bus, MANAGER_PATH, "org.freedesktop.DBus.Peer", "Ping", "", [])
    assert ping.message_type is MessageType.METHOD_RETURN


def test_sd_bus_sees_invalid_args(bus: PrivateBus, daemon: DaemonProcess) -> None:
    """busctl (sd-bus, as a C VMM) sends what it is told: it gets InvalidArgs, which its
    error map turns into EINVAL, not the ENOENT-like UnknownMethod."""
    result = subprocess.run(
        ["busctl", f"--address={bus.address}", "call", BUS_NAME, MANAGER_PATH,
         MANAGER_INTERFACE, "RetrieveSession", "u", "42"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode != 0
    assert 'takes the signature "s", not "u"' in result.stderr, result.stderr

