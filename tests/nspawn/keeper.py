"""An unrelated service that keeps a memfd in its fd store (FileDescriptorStorePreserve=yes),
run by the guest's own python3 as keeper.service. Each start appends a JSON line to
/var/tmp/keeper.jsonl: whether the memfd came from the fd store, its (st_dev, st_ino) and
its content. Then READY=1, and it waits for SIGTERM."""

import json
import os
import signal
import socket

OUT = "/var/tmp/keeper.jsonl"


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait below
    inherited = os.environ.get("LISTEN_PID") == str(os.getpid())
    count = int(os.environ.get("LISTEN_FDS", "0")) if inherited else 0
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.connect(address)
    if count:
        fd = 3
    else:
        fd = os.memfd_create("keeper")
        os.write(fd, b"kept by systemd across soft-reboot")
        socket.send_fds(notify, [b"FDSTORE=1\nFDNAME=keeper"], [fd])
    st = os.fstat(fd)
    line = {"from_store": bool(count), "file": [st.st_dev, st.st_ino],
            "data": os.pread(fd, 64, 0).decode()}
    with open(OUT, "a") as out:
        out.write(json.dumps(line) + "\n")
    notify.send(b"READY=1")
    signal.sigwait({signal.SIGTERM})


if __name__ == "__main__":
    main()
