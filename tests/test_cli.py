"""liveupdatectl: commands, --json, exit codes, fds in and out of a shell."""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from liveupdated import __version__
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
    assert "cannot reach the bus at unix:path=/nonexistent/bus" in nobody.stderr


async def test_no_daemon_on_the_bus_is_unreachable(bus: PrivateBus) -> None:
    result = ctl(bus, "status")
    assert result.returncode == 3
    assert result.stderr == (
        f"liveupdatectl: liveupdated is not running on the bus {bus.address} (no one owns "
        "org.liveupdate1; systemctl start liveupdated)\n")


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


# Every failure: one line on stderr, no traceback, the documented exit status.

DAEMON = [sys.executable, "-m", "liveupdated.daemon"]


def run(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          **kwargs)


def assert_one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, (result.returncode, result.stderr)
    return lines[0]


def in_shell(command: str) -> subprocess.CompletedProcess[str]:
    """`command` run by bash, so that redirections such as 3<>FILE pass an fd."""
    return run("bash", "-c", command)


def test_retrieve_exec_of_a_missing_program_is_one_line_127(
    bus: PrivateBus, tmp_path: Path
) -> None:
    line = assert_one_line(ctl(bus, "retrieve", "vm", "ram", "--exec", "no-such-vmm-x"), 127)
    assert line == "liveupdatectl: retrieve --exec: no-such-vmm-x: command not found"
    (tmp_path / "not-a-program").write_text("")
    assert_one_line(ctl(bus, "retrieve", "vm", "ram", "--exec",
                        str(tmp_path / "not-a-program")), 126)
    assert_one_line(ctl(bus, "retrieve", "vm", "ram", "--exec"), 2)
    assert_one_line(ctl(bus, "retrieve", "vm", "ram"), 2)


def test_preserve_of_an_fd_not_inherited_is_refused(bus: PrivateBus) -> None:
    line = assert_one_line(ctl(bus, "preserve", "vm-1", "tok", "9"), 2)
    assert "fd 9 was not passed to liveupdatectl" in line
    # fd 3 without the redirection: liveupdatectl's own event loop or socket would be it
    line = assert_one_line(ctl(bus, "preserve", "vm-1", "tok", "3"), 2)
    assert "fd 3 was not passed" in line
    assert_one_line(ctl(bus, "preserve", "vm-1", "tok", "x"), 2)
    assert_one_line(ctl(bus, "preserve", "vm-1", "tok", "-1"), 2)


async def test_ctrl_c_while_preserve_holds_the_session(
    client: Client, bus: PrivateBus
) -> None:
    memfd = make_memfd(4096)
    holder = await asyncio.create_subprocess_exec(
        "bash", "-c", f"exec {' '.join(CTL)} --bus '{bus.address}' preserve vm ram 3 "
        f"3<>/proc/{os.getpid()}/fd/{memfd}",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert holder.stderr is not None
    first = await asyncio.wait_for(holder.stderr.readline(), 30)
    assert b"holding session vm until the update is prepared" in first
    holder.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(holder.wait(), 30) == 130
    rest = (await holder.stderr.read()).decode()
    assert rest.splitlines() == [
        "liveupdatectl: interrupted before Prepare: session vm is dropped with its fds"
    ]
    for _ in range(100):
        if not await client.list_sessions():
            break
        await asyncio.sleep(0.05)
    assert await client.list_sessions() == []
    os.close(memfd)


def test_demo_arguments_are_checked(bus: PrivateBus) -> None:
    demo = [*CTL, "demo"]
    assert "is not a size" in assert_one_line(run(*demo, "--size", "abc"), 2)
    assert "from 4K to 1T" in assert_one_line(run(*demo, "--size", "1"), 2)
    assert "--bus does not apply" in assert_one_line(
        run(*CTL, "--bus", bus.address, "demo"), 2)
    assert_one_line(run(*demo, "--bus", bus.address), 2)
    assert "--bus" not in run(*demo, "--help").stdout


async def test_reboot_says_what_the_api_says(client: Client, bus: PrivateBus) -> None:
    assert ctl(bus, "prepare").stdout == "prepare: ok, state prepared\n"
    assert ctl(bus, "freeze").stdout == "freeze: ok, state frozen\n"
    result = ctl(bus, "--json", "reboot")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "frozen"
    assert "rebooting" not in result.stdout


async def test_refusals_name_the_command_that_was_run(client: Client, bus: PrivateBus) -> None:
    session = await client.create_session("vm")
    memfd = make_memfd(4096)
    await session.preserve_fd("ram", memfd)
    again = in_shell(f"exec {' '.join(CTL)} --bus '{bus.address}' preserve vm ram 3 "
                     f"3<>/proc/{os.getpid()}/fd/{memfd}")
    line = assert_one_line(again, 1)
    assert line == ("liveupdatectl: TokenExists: session 'vm' already holds token 'ram'; "
                    "`liveupdatectl unpreserve vm ram` first")
    assert ctl(bus, "unpreserve", "vm", "ram").returncode == 0
    assert await session.list_fds() == []
    await client.prepare()
    late = in_shell(f"exec {' '.join(CTL)} --bus '{bus.address}' preserve vm-2 ram 3 "
                    f"3<>/proc/{os.getpid()}/fd/{memfd}")
    assert assert_one_line(late, 1) == (
        "liveupdatectl: WrongState: preserve is allowed in state normal, not prepared"
    )
    assert "UnpreserveFd" not in assert_one_line(ctl(bus, "unpreserve", "vm", "ram"), 1)
    os.close(memfd)


def test_help_describes_every_argument_and_version() -> None:
    from liveupdated.cli import _parser

    parsers = [_parser()]
    for action in parsers[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += action.choices.values()
    for parser in parsers:
        assert parser.description, parser.prog
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (parser.prog, action.dest)
    top = run(*CTL, "--help").stdout
    assert "lives with the bus connection that created it until Prepare" in top
    assert "130" in top and "127" in top
    preserve = run(*CTL, "preserve", "--help").stdout
    assert "holding the session" in preserve
    assert run(*CTL, "--version").stdout == f"liveupdatectl {__version__}\n"
    assert run(*DAEMON, "--version").stdout == f"liveupdated {__version__}\n"
    daemon_help = run(*DAEMON, "--help").stdout
    assert "until Prepare" in daemon_help and "(default: 744" in daemon_help


def test_usage_errors_of_both_commands_are_one_line(tmp_path: Path) -> None:
    assert_one_line(run(*CTL, "frobnicate"), 2)
    assert_one_line(run(*CTL), 2)
    assert "neither system, session nor a D-Bus address" in assert_one_line(
        run(*CTL, "--bus", "nonsense", "status"), 2)
    assert_one_line(run(*DAEMON, "--frobnicate"), 2)
    assert "neither system, session nor a D-Bus address" in assert_one_line(
        run(*DAEMON, "--bus", "nonsense"), 2)
    assert_one_line(run(*DAEMON, "--max-sessions", "0"), 2)
    a_file = tmp_path / "file"
    a_file.write_text("")
    failed = assert_one_line(
        run(*DAEMON, "--bus", "unix:path=/nonexistent/bus", "--state-dir", str(a_file)), 78)
    assert "is not a directory" in failed


def test_unreachable_is_one_line(bus: PrivateBus) -> None:
    assert "ServiceUnknown" not in assert_one_line(ctl(bus, "status"), 3)
    line = assert_one_line(run(*CTL, "--bus", "unix:path=/nonexistent/bus", "list"), 3)
    assert line.startswith("liveupdatectl: cannot reach the bus at unix:path=/nonexistent/bus")
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/system_bus"}
    line = assert_one_line(run(*CTL, "status", env=env), 3)
    assert line.startswith(
        "liveupdatectl: cannot reach the system bus at unix:path=/nonexistent/system_bus: ")
