"""A tenant that floods liveupdated and never reads (run inside a container as nobody):
CONNECTIONS connections, each pipelining CALLS ListSessions without reading a reply, held
open until the unit running it is stopped. Prints "flooding" once every call is on its
way."""

import signal
import socket
import sys

from dbus_fast import Message
from dbus_fast.auth import AuthExternal

CONNECTIONS, CALLS = int(sys.argv[1]), int(sys.argv[2])
PATH = "/run/dbus/system_bus_socket"


def connect() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(PATH)
    auth = AuthExternal()
    sock.sendall(b"\0" + auth._authentication_start().encode() + b"\r\n")
    assert sock.recv(4096).startswith(b"OK")
    sock.sendall(b"BEGIN\r\n")
    hello = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member="Hello", serial=1)
    sock.sendall(hello._marshall(False))
    return sock


socks = []
for _ in range(CONNECTIONS):
    sock = connect()
    for serial in range(2, CALLS + 2):
        call = Message(destination="org.liveupdate1", path="/org/liveupdate1",
                       interface="org.liveupdate1.Manager", member="ListSessions",
                       serial=serial)
        sock.sendall(call._marshall(False))
    socks.append(sock)
print("flooding", flush=True)
signal.pause()  # until stopped: replies pile up unread meanwhile
