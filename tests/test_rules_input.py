"""Bad input over a real bus: names, tokens and fds are checked; handover or journal data
that fails its checks gives Corrupted and is never handed out; every error leaves every
other session untouched.
"""

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from liveupdated.backends.simulated import RECORD_NAME
from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import Corrupted, InvalidArgument, UnsupportedFd
from liveupdated.core.records import FdPreserved
from liveupdated.privatebus import PrivateBus
from tests.conftest import carried_data, make_memfd
from tests.other_uid import OtherUid, content_digest, digest
from tests.rules_support import NOBODY, Host, journal_frames

BAD_NAMES = ["", "x" * 64, "has space", "colon:", "slash/", "ünïcode", "tab\t", "semi;colon",
             "dollar$", "new\nline", "star*"]


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


async def everything(host: Host, root: Client, nobody: OtherUid) -> dict[str, Any]:
    """What every other session looks like: the bystanders of each error."""
    sessions = await root.list_sessions()
    fds = {s.name: await SessionClient(root, s.name, s.path).list_fds() for s in sessions}
    return {
        "sessions": sessions,
        "fds": fds,
        "nobody": await nobody.call("list_sessions"),
        "open_fds": await host.open_fds(root),
        "state": await root.state(),
    }


async def bystanders(root: Client, nobody: OtherUid) -> None:
    vm = await root.create_session("bystander")
    fd = make_memfd(4096, b"bystander")
    await vm.preserve_fd("ram", fd)
    os.close(fd)
    await nobody.call("create_session", name="65534-nobody-vm")
    await nobody.call("preserve_fd", session="65534-nobody-vm", token="ram", data=b"n".hex())


async def test_names_and_tokens_are_validated(host: Host) -> None:
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        await bystanders(root, nobody)
        vm = await root.create_session("vm")
        before = await everything(host, root, nobody)
        fd = make_memfd(4096, b"x")
        for bad in BAD_NAMES:
            with pytest.raises(InvalidArgument, match=r"A-Za-z0-9_\.-"):
                await root.create_session(bad)
            with pytest.raises(InvalidArgument, match=r"A-Za-z0-9_\.-"):
                await nobody.call("create_session", name=bad)
            with pytest.raises(InvalidArgument, match=r"A-Za-z0-9_\.-"):
                await vm.preserve_fd(bad, fd)
            with pytest.raises(InvalidArgument, match=r"A-Za-z0-9_\.-"):
                await vm.preserve_fd("ok", fd, [bad])
            with pytest.raises(InvalidArgument, match=r"A-Za-z0-9_\.-"):
                await vm.unpreserve_fd(bad)
            with pytest.raises(InvalidArgument, match=r"A-Za-z0-9_\.-"):
                await vm.retrieve_fd(bad)
        os.close(fd)
        assert await everything(host, root, nobody) == before

        # The longest valid name, every allowed character, and systemd's path escaping.
        longest = await root.create_session("A" * 63)
        assert longest.path == "/org/liveupdate1/session/" + "A" * 63
        odd = await root.create_session("a.b_c-9")
        assert odd.path == "/org/liveupdate1/session/a_2eb_5fc_2d9"
        fd = make_memfd(10, b"odd")
        await odd.preserve_fd("T.o_k-3n" + "n" * 55, fd)
        os.close(fd)
        assert (await odd.properties())["Name"] == "a.b_c-9"


def unsupported_fds(tmp_path: Path) -> dict[str, int]:
    """One fd of each kind liveupdated must refuse, by what it is."""
    memfd = make_memfd(4096, b"data")
    (tmp_path / "file").write_bytes(b"regular")
    r, w = os.pipe()
    a, b = socket.socketpair()
    fds = {
        "pipe": r,
        "socket": a.detach(),
        "regular file": os.open(tmp_path / "file", os.O_RDONLY),
        "directory": os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        "device": os.open("/dev/null", os.O_RDONLY),
        "eventfd": os.eventfd(0),
        "O_PATH memfd": os.open(f"/proc/self/fd/{memfd}", os.O_PATH),
        "write-only memfd": os.open(f"/proc/self/fd/{memfd}", os.O_WRONLY),
    }
    with contextlib.suppress(OSError):  # no hugetlbfs here
        fds["hugetlb memfd"] = os.memfd_create("huge", os.MFD_HUGETLB)
    for fd in (w, memfd):
        os.close(fd)
    b.close()
    return fds


async def test_unsupported_and_unreadable_fds_are_refused(host: Host, tmp_path: Path) -> None:
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        await bystanders(root, nobody)
        vm = await root.create_session("vm")
        before = await everything(host, root, nobody)
        fds = unsupported_fds(tmp_path)
        try:
            for kind, fd in fds.items():
                with pytest.raises(UnsupportedFd, match="memfd") as refused:
                    await vm.preserve_fd("t", fd)
                assert "memfd" in str(refused.value), kind
        finally:
            for fd in fds.values():
                os.close(fd)
        assert await everything(host, root, nobody) == before

        # A read-only reopen of a memfd is readable, so it is carried.
        memfd = make_memfd(4096, b"read-only view")
        readonly = os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY)
        await vm.preserve_fd("ro", readonly)
        for fd in (memfd, readonly):
            os.close(fd)
        assert [f.token for f in await vm.list_fds()] == ["ro"]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


async def _prepare_reboot(host: Host, root: Client, nobody: OtherUid) -> dict[str, Any]:
    """vm-a (ram, disk) of root and 65534-vm-b of nobody, frozen; their expected digests."""
    vm = await root.create_session("vm-a")
    want = {}
    for token, content in (("ram", b"ram of vm-a"), ("disk", b"disk of vm-a")):
        fd = make_memfd(8192, content)
        await vm.preserve_fd(token, fd)
        want[token] = digest(fd)
        os.close(fd)
    await nobody.call("create_session", name="65534-vm-b")
    await nobody.call("preserve_fd", session="65534-vm-b", token="ram", data=b"vm-b".hex())
    await root.prepare()
    await root.freeze()
    return want


async def test_a_damaged_kexec_record_gives_corrupted_and_hands_nothing_out(
    host: Host,
) -> None:
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        await _prepare_reboot(host, root, nobody)

        def damage() -> None:
            flip_byte(host.handover_dir / RECORD_NAME, 12)

        try:
            await host.reboot(root, between=damage)
        except RuntimeError as exc:
            pytest.fail(f"liveupdated did not come up to answer Corrupted: {exc}")

    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        with pytest.raises(Corrupted):
            vm = await root.retrieve_session("vm-a")
            os.close(await vm.retrieve_fd("ram"))
        with pytest.raises(Corrupted):
            await nobody.call("retrieve_session", name="65534-vm-b")
            await nobody.call("retrieve_fd", session="65534-vm-b", token="ram")
        # The host can still be brought back to normal, with nothing left over.
        await (root.finish() if await root.state() == "updated" else root.cancel())
        assert await root.state() == "normal"
        assert host.handover_files() == []


async def test_damaged_handover_data_gives_corrupted_for_that_fd_only(host: Host) -> None:
    """A truncated data file (vm-a/disk) and one flipped byte of content (vm-a/ram): each
    fails its checks, is never handed out, and every other fd comes back intact."""
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        fd = make_memfd(8192, b"intact")
        await (await root.create_session("vm-c")).preserve_fd("ram", fd)
        intact = digest(fd)
        os.close(fd)
        want = await _prepare_reboot(host, root, nobody)

        def damage() -> None:
            ram, disk = (carried_data(host.handover_dir, "vm-a", t) for t in ("ram", "disk"))
            flip_byte(*ram)
            os.truncate(disk[0], disk[1] + 100)  # ram too, if it lies after disk

        await host.reboot(root, between=damage)

    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        vm = await root.retrieve_session("vm-a")
        with pytest.raises(Corrupted, match="vm-a/disk"):
            await vm.retrieve_fd("disk")
        handed_out = None
        with contextlib.suppress(Corrupted):
            handed_out = await vm.retrieve_fd("ram")
        if handed_out is not None:
            got = digest(handed_out)
            os.close(handed_out)
            pytest.fail(
                f"vm-a/ram was handed out with damaged content ({got} != {want['ram']}) "
                "instead of failing with Corrupted"
            )
        fd = await (await root.retrieve_session("vm-c")).retrieve_fd("ram")
        assert digest(fd) == intact
        os.close(fd)
        await nobody.call("retrieve_session", name="65534-vm-b")
        assert await nobody.call("retrieve_fd", session="65534-vm-b", token="ram") == (
            content_digest(b"vm-b", 4)
        )
        await root.finish()
        assert host.handover_files() == []


async def test_a_damaged_journal_record_is_never_used_and_spares_every_other_session(
    host: Host,
) -> None:
    await host.start()
    # Both owners stay connected across the restart: their sessions must be kept.
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        first = await root.create_session("vm-first")
        fd = make_memfd(4096, b"first ram")
        await first.preserve_fd("ram", fd)
        os.close(fd)
        await nobody.call("create_session", name="65534-vm-later")
        await nobody.call("preserve_fd", session="65534-vm-later", token="ram", data=b"later".hex())
        fd = make_memfd(4096, b"first disk")
        await first.preserve_fd("disk", fd)
        os.close(fd)
        await host.stop()

        ((offset, length),) = [
            (o, n) for o, n, records in journal_frames(host.journal_path) for r in records
            if isinstance(r, FdPreserved) and (r.session, r.token) == ("vm-first", "ram")
        ]
        flip_byte(host.journal_path, offset + length // 2)
        await host.start(*host.args)

        # Every record after the damaged one is intact, and so are their sessions.
        assert await nobody.call("retrieve_fd", session="65534-vm-later", token="ram") == (
            content_digest(b"later", 5)
        )
        fd = await first.retrieve_fd("disk")
        assert os.pread(fd, 10, 0) == b"first disk"
        os.close(fd)
        # The damaged record's fd is reported, never handed out as if nothing happened.
        with pytest.raises(Corrupted, match="vm-first"):
            await first.retrieve_fd("ram")
