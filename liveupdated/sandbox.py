"""Run liveupdated as a child process and know when it is ready: for demo, tests, bench.

Readiness is the daemon's own READY=1 on the notify socket this module listens on. The
listener also keeps an fd store as systemd does (FDSTORE=1, FDNAME=, FDSTOREREMOVE=1,
and LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID on the next start), so restarts and crashes
can be tested without systemd.
"""

import array
import ctypes
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

# Put inherited fds at 3.. and set LISTEN_PID to the daemon's own pid, as systemd does.
_LAUNCHER = """
import fcntl, os, sys, time
fds = [int(f) for f in os.environ.pop("SANDBOX_FDS").split(",") if f]
told = int(os.environ.pop("SANDBOX_EXEC_PIPE"))  # gets the time of the exec
tell = fcntl.fcntl(told, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds))  # above the targets
os.close(told)
pairs = sorted(zip(fds, os.environ.get("LISTEN_FDNAMES", "").split(":")))
for i, (fd, _) in enumerate(pairs):  # ascending, so 3 + i is never a fd still to move
    if fd != 3 + i:
        os.dup2(fd, 3 + i)
        os.close(fd)
if fds:
    os.environ["LISTEN_FDNAMES"] = ":".join(name for _, name in pairs)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(fds))
os.write(tell, repr(time.monotonic()).encode())
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)  # syscall number
_KCMP_FILE = 0
_libc = ctypes.CDLL(None, use_errno=True)


def same_file(a: int, b: int) -> bool:
    """Do fds `a` and `b` of this process share one open file description (kcmp(2))?"""
    if _KCMP is None:
        return False
    pid = os.getpid()
    return int(_libc.syscall(_KCMP, pid, pid, _KCMP_FILE, a, b)) == 0


class Notifications:
    """A notify socket with the parts of systemd's service manager that liveupdated uses."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="lud-notify-"))
        self.path = self.directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.path))
        self.store: dict[str, int] = {}  # the VMs' fds, by FDNAME (the first of each)
        # Further fds under a name already stored: systemd keeps every entry of a name
        # (one per open file description) and FDSTOREREMOVE drops them all.
        self.extra: list[tuple[str, int]] = []
        self.own: dict[str, int] = {}  # the daemon's own fds ("@name": its journal mark)
        self._names_by_file: dict[tuple[int, int], set[str]] = {}
        self.messages: list[str] = []
        self.ready = threading.Event()
        self.ready_at = 0.0  # time.monotonic() of the last READY=1
        self._receiving = threading.Event()  # cleared: a busy manager, messages queue up
        self._receiving.set()
        self.changed = threading.Condition()
        self._settles = 0
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        fd_size = array.array("i").itemsize
        while True:
            self._receiving.wait()
            try:
                data, ancdata, _, _ = self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(253 * fd_size)
                )
            except OSError:
                return
            if not data:
                return
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fd_size])
            self._handle(data.decode(), list(fds))

    def _handle(self, text: str, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        with self.changed:
            self.messages.append(text)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    if self._stored_already(fd):
                        os.close(fd)  # systemd's same_fd(): one fd per open file description
                        continue
                    if name == "@journal-mark" or name.startswith("@luo/"):
                        self._unstore(name)
                        self.own[name] = fd
                        continue
                    if name in self.store:
                        self.extra.append((name, fd))
                    else:
                        self.store[name] = fd
                    st = os.fstat(fd)
                    self._names_by_file.setdefault((st.st_dev, st.st_ino), set()).add(name)
                fds = []
            if fields.get("FDSTOREREMOVE") == "1":
                self._unstore(name)
            for fd in fds:
                os.close(fd)
            if fields.get("READY") == "1":
                self.ready_at = time.monotonic()
                self.ready.set()
            self.changed.notify_all()

    def stored(self) -> list[tuple[str, int]]:
        """Everything in the store, as systemd passes it on the next start."""
        return [*self.store.items(), *self.extra, *self.own.items()]

    def _stored_already(self, fd: int) -> bool:
        st = os.fstat(fd)
        names = self._names_by_file.get((st.st_dev, st.st_ino), ())
        held = [self.store[name] for name in names if name in self.store]
        held += [other for name, other in self.extra if name in names]
        return any(same_file(other, fd) for other in held)

    def _unstore(self, name: str) -> None:
        if name in self.own:
            os.close(self.own.pop(name))
            return
        fds = [self.store.pop(name)] if name in self.store else []
        fds += [fd for other, fd in self.extra if other == name]
        self.extra = [(other, fd) for other, fd in self.extra if other != name]
        for fd in fds:
            st = os.fstat(fd)
            self._names_by_file.get((st.st_dev, st.st_ino), set()).discard(name)
            os.close(fd)

    def pause(self) -> None:
        """Stop reading, as a busy service manager would: senders find the queue full."""
        self._receiving.clear()

    def resume(self) -> None:
        self._receiving.set()

    def wait_for(self, predicate: Callable[["Notifications"], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)

    def settle(self, timeout: float = 30) -> None:
        """Until every message sent to the socket so far is handled: a datagram of our
        own, read after all that came before it (one socket, one reader, in order). A
        reply of the daemon's says nothing of the messages it sent before it, unless it
        waited for a BARRIER=1 (as PreserveFd does; a release does not)."""
        self._settles += 1
        marker = f"X_TEST_SETTLE={self._settles}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(marker.encode(), str(self.path))
        if not self.wait_for(lambda n: marker in n.messages, timeout):
            raise TimeoutError(f"the notify socket's reader did not reach {marker}")

    def close(self) -> None:
        self.resume()
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)
        for fd in [*self.store.values(), *(fd for _, fd in self.extra), *self.own.values()]:
            os.close(fd)
        self.extra.clear()
        self.store.clear()
        self.own.clear()
        self.path.unlink(missing_ok=True)
        self.directory.rmdir()


class DaemonProcess:
    """One liveupdated process; `start()` returns once it has sent READY=1."""

    def __init__(
        self,
        bus_address: str,
        state_dir: Path,
        *extra_args: str,
        log: IO[bytes] | None = None,
        env: dict[str, str] | None = None,
        notifications: Notifications | None = None,
    ) -> None:
        self.bus_address = bus_address
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.log = log
        self.env = env or {}
        self.notifications = notifications or Notifications()
        self._own_notifications = notifications is None
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.exec_at = 0.0  # when the launcher, fds in place, exec'd the daemon
        self.ready_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        return [
            "-m", "liveupdated.daemon", "--bus", self.bus_address,
            "--state-dir", str(self.state_dir), "--reboot-action", "exit", *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> Self:
        notes = self.notifications
        notes.ready.clear()
        stored = notes.stored()
        fds = [fd for _, fd in stored]
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(notes.path),
            "SANDBOX_FDS": ",".join(map(str, fds)),
            "LISTEN_FDNAMES": ":".join(name for name, _ in stored),
            **self.env,
        }
        env.pop("INVOCATION_ID", None)
        told, tell = os.pipe()
        env["SANDBOX_EXEC_PIPE"] = str(tell)
        self.started_at = time.monotonic()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, *self.command()],
                env=env, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
                pass_fds=[*fds, tell],
            )
        finally:
            os.close(tell)
        with os.fdopen(told, "rb") as exec_time:
            self.exec_at = float(exec_time.read() or self.started_at)
        while not notes.ready.wait(0.05):
            if self.process.poll() is not None:
                raise RuntimeError(f"liveupdated exited {self.process.returncode} before READY=1")
            if time.monotonic() - self.started_at > timeout:
                self.kill()
                raise RuntimeError(f"liveupdated sent no READY=1 within {timeout}s")
        self.ready_at = notes.ready_at
        return self

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def close(self) -> None:
        self.kill()
        if self._own_notifications:
            self.notifications.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

