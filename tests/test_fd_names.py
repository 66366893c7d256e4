"""Session.FdNames over a real bus: each memfd's name as it was preserved, kept by the
journal across the reboot (FdPreserved.name), whatever the backend hands back (the
kernel backend's memfds come back nameless)."""

import os

import pytest

from liveupdated.client import Client
from liveupdated.core.errors import AccessDenied, NoSuchSession
from liveupdated.privatebus import PrivateBus
from tests.conftest import Host, make_memfd
from tests.other_uid import OtherUid

NAMES = {"ram": "guest-ram-0", "state": "vm-state", "rom": ""}


async def test_fd_names_are_the_names_as_preserved_before_and_after_the_reboot(
    host: Host, bus: PrivateBus
) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm")
        assert await session.fd_names() == {}
        for token, name in NAMES.items():
            fd = make_memfd(8192, token.encode(), name=name)
            try:
                await session.preserve_fd(token, fd)
            finally:
                os.close(fd)
        assert await session.fd_names() == NAMES
        await vmm.prepare()
        assert await session.fd_names() == NAMES  # any state
        await vmm.freeze()
        await vmm.reboot()
        assert host.daemons[-1].wait() == 0
        host.start_now()
        session = await vmm.retrieve_session("vm")
        assert await session.fd_names() == NAMES  # from the journal
        os.close(await session.retrieve_fd("ram"))
        assert await session.fd_names() == NAMES
        await session.finish()


async def test_fd_names_are_the_owners_only(host: Host, bus: PrivateBus) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm, OtherUid(bus.address) as nobody:
        session = await vmm.create_session("vm")
        fd = make_memfd(4096, b"ram", name="guest-ram")
        try:
            await session.preserve_fd("ram", fd)
        finally:
            os.close(fd)
        with pytest.raises(AccessDenied, match="uid 0"):
            await nobody.call("fd_names", session="vm")
        await session.close()
        with pytest.raises(NoSuchSession):
            await session.fd_names()
