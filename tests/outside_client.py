"""A VMM written only from the published contract (docs/API.md, dbus/*.xml) with another
D-Bus library (dbus-python, libdbus).

Run by Debian's /usr/bin/python3: `outside_client.py ADDRESS before|after`. `before`
makes a memfd, hands it over and drives Prepare/Freeze/Reboot; `after` retrieves it and
prints its content digest, size, seals and name as JSON, then calls Finish.
"""

import fcntl
import hashlib
import json
import os
import sys

import dbus

NAME, PATH = "org.liveupdate1", "/org/liveupdate1"
CONTENT = b"written by libdbus " * 1000


def main() -> None:
    address, stage = sys.argv[1], sys.argv[2]
    bus = dbus.bus.BusConnection(address)
    manager = dbus.Interface(bus.get_object(NAME, PATH), "org.liveupdate1.Manager")
    if stage == "before":
        path = manager.CreateSession("libdbus-vm")
        session = dbus.Interface(bus.get_object(NAME, path), "org.liveupdate1.Session")
        fd = os.memfd_create("libdbus-ram", os.MFD_ALLOW_SEALING)
        os.write(fd, CONTENT)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        session.PreserveFd("ram", dbus.types.UnixFd(fd), dbus.Array([], signature="s"))
        for step in ("Prepare", "Freeze", "Reboot"):
            getattr(manager, step)()
        return
    path = manager.RetrieveSession("libdbus-vm")
    session = dbus.Interface(bus.get_object(NAME, path), "org.liveupdate1.Session")
    fd = session.RetrieveFd("ram").take()
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    print(json.dumps({
        "sha256": hashlib.sha256(data).hexdigest(),
        "expected": hashlib.sha256(CONTENT).hexdigest(),
        "seals": fcntl.fcntl(fd, fcntl.F_GET_SEALS),
        "name": os.readlink(f"/proc/self/fd/{fd}"),
        "state": str(bus.get_object(NAME, PATH).Get(
            "org.liveupdate1.Manager", "State", dbus_interface=dbus.PROPERTIES_IFACE)),
    }))
    manager.Finish()


if __name__ == "__main__":
    main()
