"""The simulated handover area when the disk refuses: Reboot fails with Storage, nothing
half-written stays, and Cancel or a retry works; nothing planted there is followed."""

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated.backends.simulated import DATA_DIR, RECORD_NAME, RECORD_TEMP, SimulatedBackend
from liveupdated.client import Client
from liveupdated.core.errors import Storage
from liveupdated.core.orchestrator import FdEntry
from liveupdated.demo import fingerprint
from liveupdated.privatebus import PrivateBus
from tests.conftest import DaemonFactory, carried_data, make_memfd


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs."""
    path = tmp_path / "small"
    path.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def entry(token: str, size: int) -> FdEntry:
    return FdEntry(token=token, kind="memfd", requires=(), size=size, name="ram", seals=0)


def ignore(_: int) -> None:
    pass


async def test_reboot_on_a_full_handover_area_fails_with_storage_and_leaves_nothing(
    bus: PrivateBus, start_daemon: DaemonFactory, small_disk: Path
) -> None:
    handover = small_disk / "handover"
    old = start_daemon("--handover-dir", str(handover))
    (handover / "before").write_bytes(b"not ours")
    ram = make_memfd(2 << 20, os.urandom(2 << 20))
    want = fingerprint(ram)
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm")
        await session.preserve_fd("ram", ram)
        await vmm.prepare()
        await vmm.freeze()
        for _ in range(2):  # a retry fails the same way, from a clean area
            with pytest.raises(Storage) as full:
                await vmm.reboot()
            assert str(full.value) == (
                f"handover area {handover}: No space left on device (ENOSPC)"
            )
            assert os.listdir(handover) == ["before"]
            assert await vmm.state() == "frozen"
        await vmm.cancel()
        assert await vmm.state() == "normal"
        assert os.listdir(handover) == ["before"]

        await vmm.prepare()
        await vmm.freeze()
        with pytest.raises(Storage):
            await vmm.reboot()
        mount("-o", "remount,size=8m", str(small_disk))  # room made
        await vmm.reboot()
    os.close(ram)
    assert old.wait() == 0
    assert sorted(os.listdir(handover)) == sorted(["before", DATA_DIR, RECORD_NAME])

    start_daemon("--handover-dir", str(handover))
    async with await Client.connect(bus.address) as vmm:
        assert await vmm.state() == "updated"
        fd = await (await vmm.retrieve_session("vm")).retrieve_fd("ram")
        assert fingerprint(fd) == want
        os.close(fd)


async def test_reboot_on_a_read_only_handover_area_fails_with_storage(
    bus: PrivateBus, start_daemon: DaemonFactory, small_disk: Path
) -> None:
    handover = small_disk / "handover"
    old = start_daemon("--handover-dir", str(handover))
    ram = make_memfd(4096, b"guest")
    async with await Client.connect(bus.address) as vmm:
        await (await vmm.create_session("vm")).preserve_fd("ram", ram)
        await vmm.prepare()
        await vmm.freeze()
        mount("-o", "remount,ro", str(small_disk))
        with pytest.raises(Storage) as refused:
            await vmm.reboot()
        assert str(refused.value) == f"handover area {handover}: Read-only file system (EROFS)"
        assert await vmm.state() == "frozen"
        mount("-o", "remount,rw", str(small_disk))
        await vmm.reboot()
    os.close(ram)
    assert old.wait() == 0
    assert (handover / RECORD_NAME).is_file()


def test_a_record_that_does_not_fit_leaves_no_temp_file(small_disk: Path) -> None:
    area = small_disk / "handover"
    area.mkdir(mode=0o700)
    backend = SimulatedBackend(area)
    backend.discard_handover()
    free = os.statvfs(area)
    size = free.f_bavail * free.f_frsize  # the data fits to the byte, the record cannot
    ram = make_memfd(size, b"x" * size)
    try:
        with pytest.raises(Storage, match=r"No space left on device \(ENOSPC\)$"):
            backend.write_handover({("vm", "ram"): ram}, {("vm", "ram"): entry("ram", size)},
                                   "boot", ignore)
    finally:
        os.close(ram)
    assert os.listdir(area) == []
    assert backend.find_handover() is None


def test_an_io_error_at_the_record_fsync_is_storage_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    area = tmp_path / "handover"
    backend = SimulatedBackend(area)
    ram = make_memfd(1 << 20)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Storage) as failed:
        backend.write_handover({("vm", "ram"): ram}, {("vm", "ram"): entry("ram", 1 << 20)},
                               "boot", ignore)
    os.close(ram)
    assert str(failed.value) == f"handover area {area}: Input/output error (EIO)"
    assert os.listdir(area) == []


def test_symlinks_planted_in_the_handover_area_are_not_followed(tmp_path: Path) -> None:
    area = tmp_path / "handover"
    area.mkdir(mode=0o700)
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("record", "temp"):
        (victims / name).write_text("precious")
    (victims / "dir").mkdir()
    (victims / "dir" / "file").write_text("precious")
    (area / RECORD_NAME).symlink_to(victims / "record")
    (area / RECORD_TEMP).symlink_to(victims / "temp")
    (area / DATA_DIR).symlink_to(victims / "dir")
    backend = SimulatedBackend(area)
    ram = make_memfd(8192, b"guest")
    backend.write_handover({("vm", "ram"): ram}, {("vm", "ram"): entry("ram", 8192)},
                           "boot", ignore)
    os.close(ram)
    for name in ("record", "temp", "dir/file"):
        assert (victims / name).read_text() == "precious", name
    assert sorted(os.listdir(victims / "dir")) == ["file"]
    assert sorted(os.listdir(area)) == sorted([DATA_DIR, RECORD_NAME])
    for path, mode in ((area / RECORD_NAME, 0o600), (area / DATA_DIR, 0o700),
                       (carried_data(area, "vm", "ram")[0], 0o600)):
        st = os.lstat(path)
        assert not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) == mode, path
    handover = SimulatedBackend(area).find_handover()
    assert handover is not None and handover.keys == {("vm", "ram")}

    # A record replaced by a symlink since is damage, not something to read through.
    (area / RECORD_NAME).unlink()
    (area / RECORD_NAME).symlink_to(victims / "record")
    damaged = SimulatedBackend(area).find_handover()
    assert damaged is not None and damaged.damage


def test_packs_that_fill_the_disk_fail_with_storage_and_a_retry_carries_every_fd(
    small_disk: Path,
) -> None:
    """Small fds share their session's pack: the disk fills in the middle of one; nothing
    of the attempt stays, and once there is room every fd comes back byte-exact."""
    area = small_disk / "handover"
    fds = {(f"vm{s}", f"ram{t}"): make_memfd(96 << 10, os.urandom(96 << 10))
           for s in range(2) for t in range(8)}  # 1.5 MiB of data on a 1 MiB disk
    entries = {key: entry(key[1], 96 << 10) for key in fds}
    want = {key: fingerprint(fd) for key, fd in fds.items()}
    with pytest.raises(Storage, match="No space left on device"):
        SimulatedBackend(area).write_handover(fds, entries, "boot", ignore)
    assert os.listdir(area) == []
    mount("-o", "remount,size=4m", str(small_disk))
    SimulatedBackend(area).write_handover(fds, entries, "boot", ignore)
    assert len(os.listdir(area / DATA_DIR)) == 2  # a pack per session
    for fd in fds.values():
        os.close(fd)
    backend = SimulatedBackend(area)
    for key in fds:
        fd = backend.retrieve_fd(key, entries[key])
        assert fingerprint(fd) == want[key], key
        os.close(fd)
