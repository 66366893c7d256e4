"""A QEMU guest (TCG: the nested /dev/kvm here cannot run it) whose serial console is read
line by line, each line stamped with the host's monotonic clock as it arrives."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

CMDLINE = "console=ttyS0 root=/dev/vda rw kho=on liveupdate=on panic=-1 oops=panic"
MARKER = "LUO-TEST "
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|M)")


@dataclass
class Line:
    at: float
    text: str


@dataclass
class Event:
    at: float
    name: str
    fields: dict[str, Any]


@dataclass
class Guest:
    kernel: Path
    image: Path
    log: Path
    append: str = ""
    memory: str = "2G"
    cpus: int = 2
    lines: list[Line] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = None
    _reader: threading.Thread | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)
    started: float = 0.0

    def command(self) -> list[str]:
        return [
            "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-m", self.memory, "-smp", str(self.cpus),
            "-kernel", str(self.kernel), "-append", f"{CMDLINE} {self.append}".strip(),
            "-drive", f"file={self.image},if=virtio,format=raw,cache=unsafe",
            "-snapshot",  # the image stays as built: every test boots the same disk
            "-device", "virtio-rng-pci",
            "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot",
        ]

    def __enter__(self) -> Self:
        if shutil.which("qemu-system-x86_64") is None:
            raise RuntimeError("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
        self.started = time.monotonic()
        self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._process.stdout is not None:
            self._process.stdout.close()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        with self.log.open("w") as log:
            for raw in self._process.stdout:
                now = time.monotonic()
                text = ANSI.sub("", raw.decode(errors="replace")).strip("\r\n")
                log.write(f"{now - self.started:9.3f} {text}\n")
                log.flush()
                with self._changed:
                    self.lines.append(Line(now, text))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def events(self) -> list[Event]:
        found = []
        for line in list(self.lines):
            position = line.text.find(MARKER)
            if position < 0:
                continue
            name, _, rest = line.text[position + len(MARKER):].partition(" ")
            try:
                fields = json.loads(rest) if rest else {}
            except json.JSONDecodeError:
                continue  # interleaved with other console output: the journal has it
            found.append(Event(line.at, name, fields))
        return found

    def wait_for(self, check: Callable[[Guest], Any], what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = check(self)
                if value is not None:
                    return value
                if not self.running() and (self._reader is None or
                                           not self._reader.is_alive()):
                    value = check(self)  # it may have stopped since: that may be the answer
                    if value is not None:
                        return value
                    raise RuntimeError(f"the guest stopped before {what}; console: {self.log}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what}: not within {timeout:.0f}s; console: {self.log}")
                self._changed.wait(min(left, 1.0))

    def event(self, name: str, timeout: float) -> Event:
        def check(guest: Guest) -> Event | None:
            return next((e for e in guest.events() if e.name == name), None)

        return self.wait_for(check, f"LUO-TEST {name}", timeout)  # type: ignore[no-any-return]

    def first_line_after(self, at: float, text: str) -> Line | None:
        return next((ln for ln in self.lines if ln.at > at and text in ln.text), None)

