"""Ownership over a real bus: a session belongs to the uid (and unit) that created it.

Only that uid or root may see, use or retrieve it, before and after the reboot; the
host's update (Prepare, Freeze, Cancel, Reboot, Finish) is the admin's alone.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import AccessDenied
from liveupdated.core.names import session_path
from liveupdated.core.records import SessionCreated
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd
from tests.other_uid import OtherUid, content_digest, digest
from tests.rules_support import NOBODY, OTHER_UID, Host, session_names, unit_cgroup


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


RAM = b"nobody's guest memory"
HOST_COMMANDS = ["prepare", "freeze", "cancel", "reboot", "finish"]


async def test_owner_uid_and_unit_are_recorded_in_the_journal(host: Host) -> None:
    await host.start()
    with unit_cgroup() as cgroup:
        if cgroup is None:
            pytest.skip("no cgroup can be created here to stand in for a systemd unit")
        async with OtherUid(host.address, NOBODY, cgroup=cgroup) as nobody:
            await nobody.call("create_session", name="65534-vm-nobody")
            props = await nobody.call("session_properties", session="65534-vm-nobody")
            created = [
                r for r in host.journal_records()
                if isinstance(r, SessionCreated) and r.session == "65534-vm-nobody"
            ]
    assert [(r.uid, r.unit) for r in created] == [(NOBODY, cgroup.name)]
    assert (props["Owner"], props["Unit"]) == (NOBODY, cgroup.name)


async def test_list_sessions_shows_root_all_and_others_their_own(host: Host) -> None:
    await host.start()
    async with (
        await host.connect() as root,
        OtherUid(host.address, NOBODY) as nobody,
        OtherUid(host.address, OTHER_UID) as third,
    ):
        await root.create_session("vm-root")
        await nobody.call("create_session", name="65534-vm-nobody")
        rows = {s.name: s.owner for s in await root.list_sessions()}
        assert rows == {"vm-root": 0, "65534-vm-nobody": NOBODY}
        assert [row[0] for row in await nobody.call("list_sessions")] == ["65534-vm-nobody"]
        assert [row[2] for row in await nobody.call("list_sessions")] == [NOBODY]
        assert await third.call("list_sessions") == []


async def _assert_denied_everything(
    intruder: OtherUid, session: str, token: str
) -> None:
    calls: list[tuple[str, dict[str, object]]] = [
        ("preserve_fd", {"token": "intruder", "data": b"x".hex()}),
        ("unpreserve_fd", {"token": token}),
        ("retrieve_fd", {"token": token}),
        ("list_fds", {}),
        ("delay_freeze", {"enable": True}),
        ("close", {}),
    ]
    for op, args in calls:
        with pytest.raises(AccessDenied, match=session):
            await intruder.call(op, session=session, **args)


async def test_another_uid_is_denied_every_session_call(host: Host) -> None:
    await host.start()
    async with (
        await host.connect() as root,
        OtherUid(host.address, NOBODY) as nobody,
        OtherUid(host.address, OTHER_UID) as third,
    ):
        mine = await root.create_session("vm-root")
        fd = make_memfd(4096, b"root ram")
        await mine.preserve_fd("ram", fd)
        await nobody.call("create_session", name="65534-vm-nobody")
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="ram", data=RAM.hex())
        before = (await mine.list_fds(), await nobody.call("list_fds", session="65534-vm-nobody"))

        await _assert_denied_everything(nobody, "vm-root", "ram")
        await _assert_denied_everything(third, "65534-vm-nobody", "ram")
        await root.prepare()
        with pytest.raises(AccessDenied, match="vm-root"):
            await nobody.call("ready_for_freeze", session="vm-root")
        with pytest.raises(AccessDenied, match="65534-vm-nobody"):
            await third.call("ready_for_freeze", session="65534-vm-nobody")
        await root.cancel()

        after = (await mine.list_fds(), await nobody.call("list_fds", session="65534-vm-nobody"))
        assert after == before
        assert sorted(await session_names(root)) == ["65534-vm-nobody", "vm-root"]
        got = await mine.retrieve_fd("ram")
        assert os.fstat(got).st_ino == os.fstat(fd).st_ino
        os.close(got)
        os.close(fd)


async def test_root_may_use_any_uids_session(host: Host) -> None:
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        path = await nobody.call("create_session", name="65534-vm-nobody")
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="ram", data=RAM.hex())
        session = SessionClient(root, "65534-vm-nobody", path)
        fd = await session.retrieve_fd("ram")
        assert digest(fd) == content_digest(RAM, len(RAM))
        os.close(fd)
        extra = make_memfd(100, b"added by root")
        await session.preserve_fd("by-root", extra)
        os.close(extra)
        assert [f.token for f in await session.list_fds()] == ["by-root", "ram"]
        assert (await session.properties())["Owner"] == NOBODY
        await session.close()
        assert await nobody.call("list_sessions") == []


async def _host_commands_are_denied(user: OtherUid, root: Client) -> None:
    state = await root.state()
    for op in HOST_COMMANDS:
        with pytest.raises(AccessDenied, match="root, or a user that polkit allows"):
            await user.call(op)
        assert await root.state() == state, f"{op} by uid {user.uid} moved the host"


async def test_host_commands_are_the_admins(host: Host) -> None:
    """Before the reboot; test_ownership_holds_after_the_reboot checks UPDATED."""
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as user:
        await user.call("create_session", name="65534-vm")
        await user.call("preserve_fd", session="65534-vm", token="ram", data=RAM.hex())
        await _host_commands_are_denied(user, root)
        await root.prepare()
        await _host_commands_are_denied(user, root)
        await root.freeze()
        await _host_commands_are_denied(user, root)
        assert await root.state() == "frozen"


async def test_ownership_holds_after_the_reboot(host: Host) -> None:
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        await nobody.call("create_session", name="65534-vm-nobody")
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="ram", data=RAM.hex(),
                          size=8192)
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="disk",
                          data=b"disk".hex())
        await root.prepare()
        await root.freeze()
        await host.reboot(root)

    async with (
        await host.connect() as root,
        OtherUid(host.address, NOBODY) as nobody,
        OtherUid(host.address, OTHER_UID) as third,
    ):
        assert await third.call("list_sessions") == []
        with pytest.raises(AccessDenied, match="65534-vm-nobody"):
            await third.call("retrieve_session", name="65534-vm-nobody")
        with pytest.raises(AccessDenied, match="65534-vm-nobody"):
            await third.call("retrieve_fd", session="65534-vm-nobody", token="ram")
        with pytest.raises(AccessDenied, match="65534-vm-nobody"):
            await third.call("finish_session", session="65534-vm-nobody")
        with pytest.raises(AccessDenied, match="65534-vm-nobody"):
            await third.call("list_fds", session="65534-vm-nobody")

        assert [r[:3] for r in await nobody.call("list_sessions")] == [
            ["65534-vm-nobody", session_path("65534-vm-nobody"), NOBODY]
        ]
        await nobody.call("retrieve_session", name="65534-vm-nobody")
        got = await nobody.call("retrieve_fd", session="65534-vm-nobody", token="ram")
        assert got == content_digest(RAM, 8192)
        root_session = await root.retrieve_session("65534-vm-nobody")
        fd = await root_session.retrieve_fd("disk")
        assert digest(fd) == content_digest(b"disk", 4)
        os.close(fd)
        await nobody.call("finish_session", session="65534-vm-nobody")
        await _host_commands_are_denied(nobody, root)
        await root.finish()
        assert await root.state() == "normal"
