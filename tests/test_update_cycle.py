"""A VMM's memfds survive a whole update across two daemon processes, byte-exact."""

import asyncio
import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest

from liveupdated.client import Client
from liveupdated.core.errors import NoSuchToken, WrongState
from liveupdated.demo import fingerprint, make_guest_memory
from liveupdated.privatebus import PrivateBus
from tests.conftest import DaemonFactory, make_memfd


async def test_memfds_come_back_byte_exact_after_reboot(
    bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    old = start_daemon()
    ram = make_guest_memory(256 << 20)
    small = make_memfd(12345, b"x" * 12345, name="firmware")
    fcntl.fcntl(small, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    empty = make_memfd(0, b"", name="empty")
    expected = {
        "ram": fingerprint(ram), "firmware": fingerprint(small), "empty": fingerprint(empty)
    }
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm-1")
        await session.preserve_fd("ram", ram)
        await session.preserve_fd("firmware", small, ["ram"])
        await session.preserve_fd("empty", empty)
        await vmm.prepare()
        await vmm.freeze()
        await vmm.reboot()
    for fd in (ram, small, empty):
        os.close(fd)
    assert old.wait() == 0

    start_daemon()
    async with await Client.connect(bus.address) as vmm:
        assert await vmm.state() == "updated"
        assert await vmm.property("LastBlackoutUSec") > 0
        session = await vmm.retrieve_session("vm-1")
        for token, want in expected.items():
            fd = await session.retrieve_fd(token)
            assert fingerprint(fd) == want, token
            os.close(fd)
        await vmm.finish()
        assert await vmm.state() == "normal"
        assert await vmm.list_sessions() == []


async def test_unretrieved_fds_are_released_at_finish(
    bus: PrivateBus, start_daemon: DaemonFactory, state_dir: os.PathLike[str]
) -> None:
    old = start_daemon()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm-2")
        fd = make_memfd()
        await session.preserve_fd("ram", fd)
        os.close(fd)
        await vmm.prepare()
        await vmm.freeze()
        await vmm.reboot()
    assert old.wait() == 0
    start_daemon()
    async with await Client.connect(bus.address) as vmm:
        await vmm.finish()
        with pytest.raises(WrongState):
            await vmm.retrieve_session("vm-2")
    handover = os.path.join(state_dir, "handover")
    assert os.listdir(handover) == []


async def test_retrieve_in_normal_returns_a_dup_of_the_same_memfd(client: Client) -> None:
    session = await client.create_session("vm")
    fd = make_memfd(4096, b"before")
    await session.preserve_fd("ram", fd)
    got = await session.retrieve_fd("ram")
    os.pwrite(fd, b"after!", 0)
    assert os.pread(got, 6, 0) == b"after!"
    assert os.fstat(got).st_ino == os.fstat(fd).st_ino
    with pytest.raises(NoSuchToken):
        await session.retrieve_fd("nope")
    os.close(got)
    os.close(fd)


async def test_a_client_of_another_library_does_the_whole_cycle(
    bus: PrivateBus, start_daemon: DaemonFactory
) -> None:
    script = Path(__file__).parent / "outside_client.py"
    old = start_daemon()
    before = subprocess.run(["/usr/bin/python3", str(script), bus.address, "before"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert before.returncode == 0, before.stderr
    assert old.wait() == 0
    start_daemon()
    after = subprocess.run(["/usr/bin/python3", str(script), bus.address, "after"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert after.returncode == 0, after.stderr
    seen = json.loads(after.stdout)
    assert seen["sha256"] == seen["expected"]
    assert seen["seals"] == fcntl.F_SEAL_GROW
    assert seen["name"] == "/memfd:libdbus-ram (deleted)"
    assert seen["state"] == "updated"
    async with await Client.connect(bus.address) as c:
        assert await c.state() == "normal"


async def test_handovers_and_retrievals_are_logged_with_session_and_token(
    bus: PrivateBus, start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon = start_daemon()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("logged")
        fd = make_memfd()
        await session.preserve_fd("ram", fd)
        os.close(await session.retrieve_fd("ram"))
        os.close(fd)
        await vmm.prepare()
        await vmm.freeze()
        await vmm.reboot()
    assert await asyncio.to_thread(daemon.wait) == 0
    events = [json.loads(line[3:]) for line in (tmp_path / "daemon.log").read_text().splitlines()
              if line.startswith("<")]
    by_name = {e["event"]: e for e in events}
    assert by_name["fds_preserved"]["session"] == "logged"
    assert by_name["fds_preserved"]["tokens"] == ["ram"]
    assert by_name["fds_preserved"]["method"] == "preserve_fd"
    assert by_name["fds_preserved"]["sender"] == vmm.bus.unique_name
    assert by_name["fd_retrieved"]["token"] == "ram"
    assert [e["new"] for e in events if e["event"] == "state_changed"] == ["prepared", "frozen"]
    assert by_name["handover_written"]["bytes"] == by_name["simulated_handover_written"]["bytes"]
    assert by_name["simulated_handover_written"]["bytes"] == 4096  # one page holds the data
    assert by_name["simulated_handover_written"]["copy_s"] > 0
    assert line_priorities(tmp_path / "daemon.log") <= {"<6>", "<4>", "<3>"}


def line_priorities(path: Path) -> set[str]:
    return {line[:3] for line in path.read_text().splitlines() if line.startswith("<")}
