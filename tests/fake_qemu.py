"""A stand-in for qemu-system-x86_64 that speaks just enough QMP for the QEMU adapter,
for the default suite (the real QEMU cycle is in tests/nspawn/test_qemu.py).

Its "guest" counts in RAM like guest/counter.S: the u32 at 0x7e00 of the memory-backend
file, one line "n=... tag=..." to the -chardev file every 20 ms while running. Its
migration stream is a magic and the counter's copy; loading it fails (and the process
exits, as QEMU's -incoming does) when the stream is missing or the RAM was zeroed.
Every QMP command is appended to $FAKE_QEMU_LOG. $FAKE_QEMU_VERSION sets --version.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

COUNTER, TAG = 0x7E00, 0x7E04
MAGIC = b"FAKE-QEMU-STATE\n"


def option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def keyvals(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


class Guest:
    def __init__(self, ram: int, serial: str | None) -> None:
        self.ram, self.serial = ram, serial
        self.running = False
        self.lock = threading.Lock()
        threading.Thread(target=self.run, daemon=True).start()

    def word(self, offset: int) -> int:
        return int.from_bytes(os.pread(self.ram, 4, offset), "little")

    def say(self, line: str) -> None:
        if self.serial:
            with open(self.serial, "a") as out:
                out.write(line + "\r\n")

    def run(self) -> None:
        while True:
            with self.lock:
                if self.running:
                    n = self.word(COUNTER) + 1
                    os.pwrite(self.ram, n.to_bytes(4, "little"), COUNTER)
                    self.say(f"n={n:08x} tag={self.word(TAG):08x}")
            time.sleep(0.02)


def main(args: list[str]) -> None:
    if args == ["--version"]:
        print(f"QEMU emulator version {os.environ.get('FAKE_QEMU_VERSION', '11.1.3')}")
        return
    backend = keyvals(option(args, "-object") or "")
    ram = os.open(backend["mem-path"], os.O_RDWR)
    serial = keyvals(option(args, "-chardev") or "").get("path")
    qmp_path = (option(args, "-qmp") or "").removeprefix("unix:").split(",")[0]
    incoming = option(args, "-incoming") == "defer"
    guest = Guest(ram, serial)
    if not incoming:
        os.pwrite(ram, bytes(8), COUNTER)
        guest.say("BOOT")
        guest.running = True
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(qmp_path)
    server.listen(1)
    conn, _ = server.accept()
    conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
    qmp = Qmp(guest, ram)
    buffer = b""
    while True:
        msg, fds, _, _ = socket.recv_fds(conn, 65536, 4)
        if not msg:
            return
        qmp.fds += fds
        buffer += msg
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            with open(os.environ.get("FAKE_QEMU_LOG", os.devnull), "a") as log:
                log.write(request["execute"] + "\n")
            reply = qmp.answer(request["execute"], request.get("arguments", {}))
            conn.sendall(json.dumps({"return": reply, "id": request.get("id")}).encode()
                         + b"\n")
            if request["execute"] == "quit":
                return


class Qmp:
    def __init__(self, guest: Guest, ram: int) -> None:
        self.guest, self.ram = guest, ram
        self.fds: list[int] = []
        self.fdsets: dict[int, int] = {}
        self.migration = "none"

    def stream(self, uri: str) -> tuple[int, int]:
        """The fd and offset of file:/dev/fdset/N,offset=O."""
        fdset = int(uri.removeprefix("file:/dev/fdset/").partition(",")[0])
        return self.fdsets[fdset], int(keyvals(uri)["offset"])

    def answer(self, command: str, arguments: dict[str, str]) -> object:
        guest = self.guest
        if command == "query-status":
            return {"status": "running" if guest.running else "paused"}
        if command == "query-version":
            return {"qemu": {"major": 11, "minor": 1, "micro": 3}}
        if command == "query-migrate":
            return {"status": self.migration}
        if command == "stop":
            with guest.lock:
                guest.running = False
        elif command == "cont":
            guest.running = True
        elif command == "add-fd":
            fdset = len(self.fdsets) + 1
            self.fdsets[fdset] = self.fds.pop()
            return {"fdset-id": fdset, "fd": self.fdsets[fdset]}
        elif command == "migrate":
            fd, offset = self.stream(arguments["uri"])
            os.pwrite(fd, MAGIC + os.pread(self.ram, 8, COUNTER), offset)
            self.migration = "completed"
        elif command == "migrate-incoming":
            fd, offset = self.stream(arguments["uri"])
            if os.pread(fd, len(MAGIC), offset) != MAGIC or guest.word(COUNTER) == 0:
                sys.stderr.write("qemu-system-x86_64: load of migration failed: "
                                 "post load hook failed\n")
                os._exit(1)
            self.migration = "completed"
        return {}

if __name__ == "__main__":
    main(sys.argv[1:])
