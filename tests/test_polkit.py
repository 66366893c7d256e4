"""Host commands delegated through polkit, as logind delegates reboot.

On the private bus a small stand-in answers org.freedesktop.PolicyKit1's
CheckAuthorization from a table of (uid, action) it allows; the nspawn suite asks the
real polkitd with a real rule. Without any authority on the bus, root only, as before.
"""

import asyncio
import os
import pwd
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from liveupdated.bus.polkit import DROP_SESSION, MANAGE, POLKIT_USER
from liveupdated.client import Client
from liveupdated.core.errors import AccessDenied
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import make_memfd
from tests.fake_polkit import Authority, serve
from tests.other_uid import REPO, OtherUid

NOBODY = 65534


@pytest.fixture
async def authority(bus: PrivateBus) -> AsyncIterator[Authority]:
    """The stand-in, run by root (the test process), as polkitd's owner may be."""
    connection, service = await serve(bus.address, {(NOBODY, MANAGE)})
    yield service
    connection.disconnect()


async def test_polkit_lets_a_user_drive_the_update_for_the_actions_it_allows(
    bus: PrivateBus, daemon: DaemonProcess, authority: Authority
) -> None:
    async with await Client.connect(bus.address) as root, OtherUid(bus.address) as nobody:
        session = await root.create_session("vm")
        fd = make_memfd(4096, b"ram")
        await session.preserve_fd("ram", fd)
        await nobody.call("prepare")
        assert await root.state() == "prepared"
        assert ("system-bus-name", MANAGE, 0) in authority.asked
        with pytest.raises(AccessDenied, match=r"org\.liveupdate1\.drop-session"):
            await nobody.call("drop_session", name="vm", reason="not allowed")
        assert ("system-bus-name", DROP_SESSION, 0) in authority.asked
        await nobody.call("cancel")
        # Delegation covers the host's commands only: a session stays its owner's.
        with pytest.raises(AccessDenied):
            await nobody.call("list_fds", session="vm")
        asked = len(authority.asked)
        await root.prepare()  # root is never asked about
        assert len(authority.asked) == asked
    # Asked by the unique name found trustworthy, not by the name anyone may take next.
    assert set(authority.destinations) == {authority.bus.unique_name}
    os.close(fd)


async def test_without_polkit_host_commands_are_roots(
    bus: PrivateBus, daemon: DaemonProcess
) -> None:
    async with OtherUid(bus.address) as nobody:
        for command in ("prepare", "freeze", "cancel", "reboot", "finish"):
            with pytest.raises(AccessDenied, match="polkit"):
                await nobody.call(command)
        with pytest.raises(AccessDenied):
            await nobody.call("drop_session", name="vm", reason="")


@asynccontextmanager
async def authority_run_by(bus: PrivateBus, uid: int) -> AsyncIterator[None]:
    """A stand-in that says yes to everything, owning the name as `uid`."""
    if os.geteuid() != 0:
        pytest.skip("a stand-in of another uid needs root to drop to that uid")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fake_polkit", str(uid), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, cwd=REPO, env={**os.environ, "LUD_BUS": bus.address})
    assert process.stdin is not None and process.stdout is not None
    try:
        async with asyncio.timeout(30):
            assert await process.stdout.readline() == b"ready\n"
        yield
    finally:
        process.stdin.close()
        async with asyncio.timeout(30):
            await process.wait()


async def test_a_polkit_name_owned_by_another_user_is_not_asked(
    bus: PrivateBus, daemon: DaemonProcess
) -> None:
    """On a bus that lets anyone own org.freedesktop.PolicyKit1, a user who took it
    would answer yes to itself: its answer is not asked for."""
    async with authority_run_by(bus, NOBODY), OtherUid(bus.address) as nobody:
        with pytest.raises(AccessDenied, match="polkit"):
            await nobody.call("prepare")
        async with await Client.connect(bus.address) as root:
            assert await root.state() == "normal"


async def test_polkit_run_by_the_polkitd_user_is_asked(
    bus: PrivateBus, daemon: DaemonProcess
) -> None:
    try:
        polkitd = pwd.getpwnam(POLKIT_USER).pw_uid
    except KeyError:
        pytest.skip(f"no {POLKIT_USER} user on this machine")
    async with authority_run_by(bus, polkitd), OtherUid(bus.address) as nobody:
        await nobody.call("prepare")
        await nobody.call("cancel")
