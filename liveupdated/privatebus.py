"""A private message bus in a directory of its own: for the demo, tests and benchmarks.

By default any uid may connect and send anything (the daemon authorizes callers itself,
as on the system bus). `policy="system"` gives the system bus's own default policy
(Debian's system.conf: method calls denied unless a policy file allows them) plus the
project's dbus/org.liveupdate1.conf, so that a test sees what a real host's bus lets
through. The limits are the compiled-in defaults of both implementations, which are the
system bus's (system.conf sets none).

`implementation="dbus-broker"` runs dbus-broker instead of dbus-daemon: its launcher
(`dbus-broker-launch`) wants a listening socket from socket activation and a journald
socket to log to, and connects to the bus it serves. Outside systemd that is provided
here: the launcher runs in a mount namespace of its own (`unshare -m`) where a tmpfs on
/run/systemd holds a journal socket whose lines are copied to dbus-broker.log.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import IO, Self

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""

# The default policy of Debian's /usr/share/dbus-1/system.conf, and the project's policy.
SYSTEM_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <include ignore_missing="no">{project_policy}</include>
</busconfig>
"""
PROJECT_POLICY = Path(__file__).resolve().parent.parent / "dbus" / "org.liveupdate1.conf"
IMPLEMENTATIONS = ("dbus-daemon", "dbus-broker")


class PrivateBus:
    """`with PrivateBus(dir) as bus:` runs a bus until the block ends."""

    def __init__(
        self, directory: Path, policy: str = "open", implementation: str = "dbus-daemon"
    ) -> None:
        if policy not in ("open", "system"):
            raise ValueError(f"unknown policy {policy!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown bus implementation {implementation!r}")
        self.directory = directory
        self.policy = policy
        self.implementation = implementation
        self.socket = directory / "bus"
        self.address = f"unix:path={self.socket}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.implementation}.log"

    def config_text(self) -> str:
        if self.policy == "system":
            return SYSTEM_CONFIG.format(socket=self.socket, project_policy=PROJECT_POLICY)
        return CONFIG.format(socket=self.socket)

    def start(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)
        config = self.directory / "bus.conf"
        config.write_text(self.config_text())
        if self.implementation == "dbus-broker":
            return self._start_broker(config)
        self.process = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=self._open_log(),
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()  # printed once listening
        if not line:
            raise RuntimeError("dbus-daemon exited before it printed its address")
        os.chmod(self.socket, 0o777)
        return self

    def _start_broker(self, config: Path) -> Self:
        self.process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", sys.executable, "-m",
             "liveupdated.privatebus", str(self.socket), str(config), str(self.log_path)],
            stdout=subprocess.PIPE,
            stderr=self._open_log(),
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            self.process.wait(timeout=10)
            raise RuntimeError(f"dbus-broker did not start: see {self.log_path}")
        return self

    def _open_log(self) -> IO[bytes]:
        self._log = self.log_path.open("ab")
        return self._log

    def stop(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None

    def kill(self) -> None:
        """The bus dies at once (SIGKILL to dbus-daemon; dbus-broker's launcher stops it)."""
        if self.process is not None:
            if self.implementation == "dbus-broker":
                self.process.terminate()
            else:
                self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _run_broker(path: str, config: str, log_path: str) -> int:
    """In a mount namespace of its own (unshare -m): a journal socket for the launcher,
    the bus's listening socket, then dbus-broker-launch until SIGTERM (passed on to it)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/systemd"],
                   check=True)
    os.mkdir("/run/systemd/journal")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind("/run/systemd/journal/socket")
    log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the process

    def copy_log() -> None:
        while True:
            fields = dict(
                line.partition(b"=")[::2] for line in journal.recv(1 << 16).split(b"\n")
            )
            log.write(fields.get(b"MESSAGE", b"?") + b"\n")

    threading.Thread(target=copy_log, daemon=True).start()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4096)
    os.chmod(path, 0o777)
    env = {**os.environ, "LISTEN_FDS": "1", "DBUS_SESSION_BUS_ADDRESS": f"unix:path={path}"}
    # The listening socket as fd 3, as socket activation passes it.
    script = ('exec 3<&"$1"; eval "exec $1<&-"; '
              'LISTEN_PID=$$ exec dbus-broker-launch --scope user --config-file "$0"')
    launcher = subprocess.Popen(
        ["sh", "-c", script, config, str(listener.fileno())],
        env=env, pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
    )
    signal.signal(signal.SIGTERM, lambda *_: launcher.terminate())
    _wait_until_listening(path, launcher)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    return launcher.wait()


def _wait_until_listening(path: str, launcher: "subprocess.Popen[bytes]") -> None:
    """The broker answers a Hello once its launcher has set it up: try until it does."""
    from dbus_fast import Message
    from dbus_fast._private.unmarshaller import Unmarshaller

    hello = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member="Hello", serial=1)
    while launcher.poll() is None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode()
                         + b"\r\nBEGIN\r\n" + bytes(hello._marshall(False)))
            line = b""
            while not line.endswith(b"\r\n"):
                line += sock.recv(1)
            if not line.startswith(b"OK "):
                continue
            reader = Unmarshaller(sock=sock, negotiate_unix_fd=False)
            with contextlib.suppress(BlockingIOError, EOFError, OSError):
                if reader.unmarshall() is not None:
                    return
    raise RuntimeError("dbus-broker-launch exited")


if __name__ == "__main__":
    sys.exit(_run_broker(*sys.argv[1:4]))
