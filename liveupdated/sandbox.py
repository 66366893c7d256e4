"""Run liveupdated as a child process and know when it is ready: for demo, tests, bench.

Readiness is the daemon's own READY=1 on a notify socket this module listens on.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self


class DaemonProcess:
    def __init__(
        self,
        bus_address: str,
        state_dir: Path,
        *extra_args: str,
        log: IO[bytes] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.bus_address = bus_address
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.log = log
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "liveupdated.daemon", "--bus", self.bus_address,
            "--state-dir", str(self.state_dir), "--reboot-action", "exit", *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> Self:
        """Start the daemon and return once it has sent READY=1."""
        directory = Path(tempfile.mkdtemp(prefix="lud-notify-"))
        path = directory / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.settimeout(timeout)
            env = {**os.environ, "NOTIFY_SOCKET": str(path), **self.env}
            env.pop("INVOCATION_ID", None)
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                self.command(), env=env, stdout=self.log, stderr=self.log,
                stdin=subprocess.DEVNULL,
            )
            try:
                while True:
                    message = sock.recv(65536).decode()
                    if "READY=1" in message.split("\n"):
                        self.ready_at = time.monotonic()
                        break
            except TimeoutError:
                self.kill()
                raise RuntimeError(f"liveupdated sent no READY=1 within {timeout}s") from None
        path.unlink()
        directory.rmdir()
        return self

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        return self.process.wait(30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
