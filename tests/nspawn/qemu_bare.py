"""A bare QEMU stop/resume without liveupdated, for comparison with the adapter's pause:
run inside the container by the installed venv's python.

  qemu_bare.py IMAGE SERIAL CYCLES   boot the guest, then CYCLES times: stop, save the
                                     device state into a memfd, quit QEMU, start a new one
                                     -incoming, load, cont; print JSON {"pauses_ms": [...]}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from liveupdated.vmm.qemu import Qemu, QemuSpec


async def main(image: str, serial: str, cycles: int) -> None:
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 64 << 20)
    state = os.memfd_create("vm-state", os.MFD_CLOEXEC)
    spec = QemuSpec(["qemu-system-x86_64"], 64 << 20, "q35", [
        "-nodefaults", "-display", "none", "-accel", "tcg",
        "-drive", f"file={image},format=raw,if=ide",
        "-chardev", f"file,id=s0,path={serial},append=on", "-serial", "chardev:s0",
    ], Path(tempfile.mkdtemp()) / "qmp.sock")
    qemu = await Qemu.start(spec, ram, incoming=False)
    await asyncio.sleep(1.0)
    pauses = []
    for _ in range(cycles):
        stopped_at, _ = await qemu.save(state)
        await qemu.quit()
        qemu = await Qemu.start(spec, ram, incoming=True)
        await qemu.load(state)
        running_at = await qemu.cont()
        pauses.append(round((running_at - stopped_at) * 1000, 1))
        await asyncio.sleep(0.3)
    await qemu.quit()
    print(json.dumps({"pauses_ms": pauses, "at": time.time()}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
