"""liveupdatectl update, check, finish --wait and the host tools, against a real daemon;
and what becomes of their output when stdout is closed or full."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from liveupdated.client import Client
from liveupdated.core import preflight
from liveupdated.core.names import escape_path_label, session_path
from liveupdated.privatebus import PrivateBus
from tests.conftest import Host, make_memfd

CTL = [sys.executable, "-m", "liveupdated.cli"]


def ctl(bus: PrivateBus, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, "--bus", bus.address, *args], capture_output=True,
                          text=True, timeout=120, check=False, **kwargs)


async def actl(bus: PrivateBus, *args: str) -> tuple[int, str, str]:
    """ctl without blocking the event loop (the test's own client keeps being served)."""
    proc = await asyncio.create_subprocess_exec(
        *CTL, "--bus", bus.address, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


async def test_check_reports_every_item_in_order_and_changes_nothing(
    client: Client, bus: PrivateBus
) -> None:
    session = await client.create_session("vm")
    fd = make_memfd(8192)
    await session.preserve_fd("ram", fd)
    result = ctl(bus, "check", "--json")
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)
    assert [i["item"] for i in items] == list(preflight.ITEMS)
    verdicts = {i["item"]: i["verdict"] for i in items}
    assert verdicts.pop("reboot-action") == "warn"  # the tests' daemon only exits
    assert set(verdicts.values()) == {"ok"}, items
    table = ctl(bus, "check").stdout.splitlines()
    assert table[0].split() == ["ITEM", "VERDICT", "DETAIL"] and len(table) == 9
    assert await client.state() == "normal" and await client.get_history() == []
    os.close(fd)


async def test_update_refused_by_its_preflight_changes_nothing(
    client: Client, bus: PrivateBus
) -> None:
    session = await client.create_session("vm")
    fd = make_memfd(8192)
    await session.preserve_fd("ram", fd, ["rom"])  # rom is never preserved
    code, out, err = await actl(bus, "update")
    assert code == 5, err
    line = one_line(err)
    assert line.startswith("liveupdatectl: update: preflight failed, nothing changed: ")
    assert "requires: missing: vm/rom (required by ram)" in line
    assert out == ""
    assert await client.state() == "normal" and await client.get_history() == []
    code, out, _ = await actl(bus, "check")
    assert code == 5 and "fail" in out
    os.close(fd)


async def test_update_then_finish_wait_carries_a_vm_across(host: Host) -> None:
    await host.start()
    bus = host.bus
    data = b"guest memory " * 300
    fd = make_memfd(1 << 20, data)
    async with await host.connect() as vmm:
        session = await vmm.create_session("vm")
        await session.preserve_fd("ram", fd)
        old = host.daemon
        assert old is not None
        code, out, err = await actl(bus, "update", "--timeout", "30")
        assert code == 0, err
        assert out.splitlines() == ["check: ok", "prepare: ok", "freeze: ok",
                                    "reboot: handover written", "reboot: under way"]
        assert await asyncio.to_thread(old.wait, 60) == 0
    await host.start()
    async with await host.connect() as vmm:
        code, _, err = await actl(bus, "finish", "--wait", "--timeout", "0.5")
        assert code == 9, err
        assert one_line(err).endswith("vm (1 fds, incoming); Finish not called")
        assert await vmm.state() == "updated"
        waiting = asyncio.create_task(actl(bus, "finish", "--wait", "--timeout", "60"))
        session = await vmm.retrieve_session("vm")
        back = await session.retrieve_fd("ram")
        assert os.pread(back, len(data), 0) == data
        code, out, err = await waiting
        assert code == 0, err
        assert out == "finish: ok, state normal\n"
        (cycle,) = await vmm.get_history()
        assert cycle["outcome"] == "finished"
        assert (cycle["prepared_by"], cycle["frozen_by"], cycle["reboot_by"],
                cycle["ended_by"]) == (os.getuid(),) * 4
        assert (cycle["fds_carried"], cycle["fds_retrieved"]) == (1, 1)
        os.close(back)
    os.close(fd)


async def test_a_freeze_that_times_out_is_cancelled(host: Host) -> None:
    await host.start("--freeze-timeout", "60")
    async with await host.connect() as vmm:
        session = await vmm.create_session("vm")
        fd = make_memfd(4096)
        await session.preserve_fd("ram", fd)
        await session.delay_freeze(True)  # and never ReadyForFreeze
        code, out, err = await actl(host.bus, "update", "--timeout", "0.5")
        assert code == 6, err
        assert one_line(err) == ("liveupdatectl: update: freeze failed: no reply within "
                                 "0.5s (--timeout); cancelled, state normal")
        assert out.splitlines() == ["check: ok", "prepare: ok"]
        assert await vmm.state() == "normal"
        (cycle,) = await vmm.get_history()
        assert cycle["outcome"] == "cancelled"
        os.close(fd)


async def test_show_prints_properties_like_systemctl(client: Client, bus: PrivateBus) -> None:
    await client.create_session("vm")
    shown = ctl(bus, "show").stdout.splitlines()
    assert "State=normal" in shown and "Backend=simulated" in shown
    assert shown == sorted(shown)
    assert ctl(bus, "show", "-p", "State", "--value").stdout == "normal\n"
    assert ctl(bus, "show", "-p", "State,Backend").stdout == "Backend=simulated\nState=normal\n"
    assert ctl(bus, "show", "vm", "-p", "FdCount").stdout == "FdCount=0\n"
    bad = ctl(bus, "show", "-p", "Nope")
    assert bad.returncode == 2 and one_line(bad.stderr).startswith(
        "liveupdatectl: show: no property Nope (there are: ")


async def test_drop_session_delay_freeze_and_ready(client: Client, bus: PrivateBus) -> None:
    await client.create_session("vm")
    await client.create_session("other")
    assert ctl(bus, "delay-freeze", "vm").stdout == (
        "delay-freeze: vm: Freeze waits for its ready-for-freeze\n")
    await client.prepare()
    laggard = ctl(bus, "check", "--json")
    assert laggard.returncode == 5  # an update is under way
    assert ctl(bus, "ready-for-freeze", "vm").returncode == 0
    assert [s.state for s in await client.list_sessions() if s.name == "vm"] == ["ready"]
    dropped = ctl(bus, "drop-session", "other", "--reason", "blocks the update")
    assert dropped.returncode == 0, dropped.stderr
    assert [s.name for s in await client.list_sessions()] == ["vm"]
    missing = ctl(bus, "drop-session", "nope")
    assert missing.returncode == 1 and "NoSuchSession" in one_line(missing.stderr)


async def test_quarantine_commands(client: Client, bus: PrivateBus) -> None:
    assert ctl(bus, "quarantine", "list").stdout == "no quarantined fd\n"
    assert json.loads(ctl(bus, "quarantine", "list", "--json").stdout) == []
    gone = ctl(bus, "quarantine", "release", "q1")
    assert gone.returncode == 1 and "NoSuchToken" in one_line(gone.stderr)
    usage = ctl(bus, "quarantine", "retrieve", "q1")
    assert usage.returncode == 2 and "--exec" in one_line(usage.stderr)


# ---- output: a closed or full stdout --------------------------------------------------

def with_closed_stdout(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    """Run with a stdout whose reader is gone already: every write is EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([*CTL, "--bus", bus.address, *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write)


async def test_a_closed_stdout_ends_a_read_only_command_quietly(
    client: Client, bus: PrivateBus
) -> None:
    for command in (["status"], ["list"], ["history"], ["show"], ["check"]):
        result = with_closed_stdout(bus, *command)
        assert (result.returncode, result.stderr) == (0, ""), command


async def test_a_closed_stdout_never_interrupts_a_change(
    client: Client, bus: PrivateBus
) -> None:
    result = with_closed_stdout(bus, "prepare")
    assert (result.returncode, result.stderr) == (0, "")
    assert await client.state() == "prepared"


async def test_a_full_stdout_is_one_line_and_exit_1(client: Client, bus: PrivateBus) -> None:
    def to_full(*args: str) -> subprocess.CompletedProcess[str]:
        with open("/dev/full", "w") as full:
            return subprocess.run([*CTL, "--bus", bus.address, *args], stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=60, check=False)

    status = to_full("status")
    assert status.returncode == 1
    assert one_line(status.stderr).startswith(
        "liveupdatectl: cannot write the output: No space left on device")
    change = to_full("prepare")
    assert change.returncode == 1 and "No space left" in one_line(change.stderr)
    assert await client.state() == "prepared"  # carried out all the same


async def test_retrieve_exec_of_a_file_that_cannot_run_is_126(
    client: Client, bus: PrivateBus, tmp_path: Path
) -> None:
    session = await client.create_session("vm")
    fd = make_memfd(4096)
    await session.preserve_fd("ram", fd)
    garbage = tmp_path / "not-elf"
    garbage.write_bytes(b"\x7fELF but not really")
    garbage.chmod(0o755)
    result = ctl(bus, "retrieve", "vm", "ram", "--exec", str(garbage))
    assert result.returncode == 126
    assert one_line(result.stderr) == (
        f"liveupdatectl: retrieve --exec: {garbage}: Exec format error")
    os.close(fd)


# ---- object paths as sd-bus computes them ---------------------------------------------

def test_paths_are_escaped_as_sd_bus_path_encode_does() -> None:
    assert escape_path_label("65534-probe") == "_365534_2dprobe"
    assert escape_path_label("vm-42") == "vm_2d42"
    assert escape_path_label("a.b_c") == "a_2eb_5fc"
    assert escape_path_label("0") == "_30"
    assert escape_path_label("") == "_"


async def test_the_daemon_exports_the_sd_bus_path(client: Client) -> None:
    session = await client.create_session("1vm")
    assert session.path == "/org/liveupdate1/session/_31vm" == session_path("1vm")
    assert (await client.properties(session.path, "org.liveupdate1.Session"))["Name"] == "1vm"
