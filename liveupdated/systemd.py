"""The systemd edge: sd_notify messages, the fd store, inherited fds and the boot id.

Text messages go through sdnotify; fds (FDSTORE=1) go over the same $NOTIFY_SOCKET with
SCM_RIGHTS, which sdnotify cannot send. Without $NOTIFY_SOCKET everything is a no-op.
"""

import os
import socket
from pathlib import Path

import sdnotify
import structlog

log = structlog.get_logger("liveupdated")

SD_LISTEN_FDS_START = 3


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def fd_name(session: str, token: str) -> str:
    return f"{session}/{token}"


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(address)
        self._text = sdnotify.SystemdNotifier()
        self._sock: socket.socket | None = None
        if address:
            if address.startswith("@"):
                address = "\0" + address[1:]
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.connect(address)

    def notify(self, *fields: str) -> None:
        if self.enabled:
            self._text.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def store_fd(self, name: str, fd: int) -> None:
        if self._sock is None:
            return
        try:
            socket.send_fds(self._sock, [f"FDSTORE=1\nFDNAME={name}".encode()], [fd])
        except OSError as exc:  # like sd_notify(): the service goes on without the store
            log.warning("fd_store_failed", fdname=name, error=exc.strerror)

    def remove_fd(self, name: str) -> None:
        self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC in seconds, when the watchdog is on for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def take_listen_fds() -> list[tuple[str, int]]:
    """(name, fd) of the fds systemd passed to this process (its fd store), once."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = int(os.environ.pop("LISTEN_FDS", "0") or 0)
    names = os.environ.pop("LISTEN_FDNAMES", "").split(":")
    if not pid or int(pid) != os.getpid():
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    names += ["unknown"] * (count - len(names))
    return list(zip(names, fds, strict=False))
