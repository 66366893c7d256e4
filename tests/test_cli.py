"""liveupdatectl: commands, --json, exit codes, fds in and out of a shell."""

import asyncio
import json
import os
import subprocess
import sys

from liveupdated.client import Client
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd

CTL = [sys.executable, "-m", "liveupdated.cli"]


def ctl(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, "--bus", bus.address, *args], capture_output=True,
                          text=True, timeout=60, check=False)


async def test_status_and_list_as_json_and_tables(client: Client, bus: PrivateBus) -> None:
    session = await client.create_session("vm")
    fd = make_memfd(8192)
    await session.preserve_fd("ram", fd)
    status = json.loads(ctl(bus, "status", "--json").stdout)
    assert (status["State"], status["Backend"], status["Sessions"], status["Fds"]) == (
        "normal", "simulated", 1, 1
    )
    listing = json.loads(ctl(bus, "--json", "list").stdout)
    assert listing[0]["name"] == "vm"
    assert listing[0]["fds"] == [{"token": "ram", "kind": "memfd", "requires": [], "size": 8192}]
    table = ctl(bus, "list").stdout.splitlines()
    assert table[0].split() == ["SESSION", "OWNER", "STATE", "TOKEN", "TYPE", "REQUIRES", "BYTES"]
    assert table[1].split() == ["vm", "0", "open", "ram", "memfd", "8192"]
    os.close(fd)


async def test_exit_codes(client: Client, bus: PrivateBus) -> None:
    assert ctl(bus, "prepare").returncode == 0
    refused = ctl(bus, "prepare")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "liveupdatectl: WrongState: Prepare is allowed in state normal, not prepared"
    )
    assert ctl(bus, "frobnicate").returncode == 2
    nobody = subprocess.run(
        [*CTL, "--bus", "unix:path=/nonexistent/bus", "status"], capture_output=True,
        text=True, timeout=60, check=False,
    )
    assert nobody.returncode == 3
    assert "cannot reach the bus" in nobody.stderr


async def test_no_daemon_on_the_bus_is_unreachable(bus: PrivateBus) -> None:
    result = ctl(bus, "status")
    assert result.returncode == 3
    assert "ServiceUnknown" in result.stderr


async def test_preserve_an_inherited_memfd_and_retrieve_it_into_a_command(
    client: Client, bus: PrivateBus
) -> None:
    memfd = make_memfd(4096, b"shell-vmm")
    holder = await asyncio.create_subprocess_exec(
        "bash", "-c",
        f"exec {' '.join(CTL)} --bus '{bus.address}' preserve vm ram 3 "
        f"3<>/proc/{os.getpid()}/fd/{memfd}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert holder.stderr is not None
    line = await asyncio.wait_for(holder.stderr.readline(), 30)
    assert b"holding session vm until the update is prepared" in line
    assert [(s.name, s.fd_count) for s in await client.list_sessions()] == [("vm", 1)]
    await client.prepare()
    assert await asyncio.wait_for(holder.wait(), 30) == 0
    await client.cancel()
    result = ctl(bus, "retrieve", "vm", "ram", "--exec", "sh", "-c",
                 'echo "$LISTEN_FDS $LISTEN_FDNAMES"; head -c 9 <&3')
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1 ram\nshell-vmm"
    os.close(memfd)
