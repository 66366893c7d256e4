"""A private dbus-daemon in a directory of its own: for the demo, tests and benchmarks.

Any uid may connect (the daemon authorizes callers itself, as on the system bus).
"""

import os
import subprocess
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


class PrivateBus:
    """`with PrivateBus(dir) as bus:` runs dbus-daemon until the block ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "bus"
        self.address = f"unix:path={self.socket}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)
        config = self.directory / "bus.conf"
        config.write_text(CONFIG.format(socket=self.socket))
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

    def _open_log(self) -> IO[bytes]:
        self._log = (self.directory / "dbus-daemon.log").open("ab")
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
