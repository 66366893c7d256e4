"""The memfd handler and the simulated handover area, on real memfds and files."""

import ctypes
import fcntl
import json
import os
import socket
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveupdated.backends.simulated import (
    PACK_BYTES,
    PACK_SUFFIX,
    RECORD_NAME,
    SimulatedBackend,
    _runs,
)
from liveupdated.client import Client
from liveupdated.core.errors import Corrupted, UnsupportedFd
from liveupdated.core.orchestrator import FdEntry
from liveupdated.demo import fingerprint, make_guest_memory
from liveupdated.fds import memfd
from liveupdated.sandbox import DaemonProcess
from tests.conftest import carried_data, open_fds


def entry(token: str, name: str = "ram") -> FdEntry:
    return FdEntry(token, "memfd", (), 0, name, 0)


def test_memfd_facts() -> None:
    fd = os.memfd_create("guest ram:1", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8192)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    facts = memfd.inspect(fd)
    os.close(fd)
    assert (facts.kind, facts.size, facts.name, facts.seals) == (
        "memfd", 8192, "guest ram:1", fcntl.F_SEAL_GROW
    )


def _unsupported(tmp_path: Path) -> dict[str, int]:
    r, w = os.pipe()
    os.close(w)
    a, b = socket.socketpair()
    b.close()
    (tmp_path / "file").write_bytes(b"x")
    memfd_wronly = os.memfd_create("w")
    return {
        "a pipe": r,
        "a socket": a.detach(),
        "a regular file": os.open(tmp_path / "file", os.O_RDONLY),
        "a directory": os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        "hugetlb": os.memfd_create("huge", os.MFD_HUGETLB),
        "O_PATH": os.open(f"/proc/self/fd/{memfd_wronly}", os.O_PATH),
        "write-only": os.open(f"/proc/self/fd/{memfd_wronly}", os.O_WRONLY),
    }


def test_everything_but_a_memfd_is_unsupported_and_names_what_is(tmp_path: Path) -> None:
    for what, fd in _unsupported(tmp_path).items():
        with pytest.raises(UnsupportedFd, match=what) as info:
            memfd.inspect(fd)
        if what != "write-only":
            assert "supported: memfd" in str(info.value)
        os.close(fd)


CLONE_NEWNS = 0x00020000
_libc = ctypes.CDLL(None, use_errno=True)


def disguised_file(directory: Path, how: str, name: str = "memfd:evil") -> int:
    """A file that the /proc link calls a memfd: `name` at the root of a mount (a new
    tmpfs, or a bind mount of `directory`, on the disk) that is then detached, as an
    unprivileged user may do in a user and mount namespace of its own. Made in a child
    with a mount namespace of its own; the fd comes back over a socket."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root (a user namespace would do for an attacker)")
    mount = directory / "mnt"
    mount.mkdir()
    (directory / "disk").mkdir()
    source = ["-t", "tmpfs", "tmpfs"] if how == "tmpfs" else ["--bind", str(directory / "disk")]
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            if _libc.unshare(CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            subprocess.run(["mount", "--make-rprivate", "/"], check=True)
            subprocess.run(["mount", *source, str(mount)], check=True)
            fd = os.open(mount / name, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, 1 << 20)
            subprocess.run(["umount", "-l", str(mount)], check=True)
            socket.send_fds(theirs, [b"fd"], [fd])
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert status == 0, "could not make the disguised file"
    with ours, theirs:
        _, fds, _, _ = socket.recv_fds(ours, 2, 1)
    (fd,) = fds
    assert os.readlink(f"/proc/self/fd/{fd}") == "/" + name  # the disguise works
    return fd


@pytest.mark.parametrize("how", ["tmpfs", "bind"])
def test_a_file_named_like_a_memfd_is_not_one(tmp_path: Path, how: str) -> None:
    """What the kernel says of the file decides, not its path: a tmpfs file (even
    reporting tmpfs to fstatfs) or a disk file whose link reads "/memfd:evil"."""
    fd = disguised_file(tmp_path, how)
    try:
        with pytest.raises(UnsupportedFd, match="not a memfd from memfd_create"):
            memfd.inspect(fd)
    finally:
        os.close(fd)


async def test_preserve_fd_refuses_a_disguised_file(tmp_path: Path, client: Client,
                                                   daemon: DaemonProcess) -> None:
    session = await client.create_session("vm")
    before = open_fds(daemon.pid)
    for how in ("tmpfs", "bind"):
        (tmp_path / how).mkdir()
        fd = disguised_file(tmp_path / how, how)
        try:
            with pytest.raises(UnsupportedFd, match="not a memfd from memfd_create"):
                await session.preserve_fd(how, fd)
        finally:
            os.close(fd)
    real = os.memfd_create("memfd:evil", os.MFD_CLOEXEC)
    await session.preserve_fd("real", real)
    os.close(real)
    assert [f.token for f in await session.list_fds()] == ["real"]
    assert open_fds(daemon.pid) == before + 1  # the refused files are closed


def test_a_dev_shm_file_is_not_a_memfd() -> None:
    """tmpfs, yet not the kernel's internal shmem mount that memfd_create uses."""
    path = Path("/dev/shm") / f"memfd:lud-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    path.unlink()
    try:
        assert os.fstat(fd).st_dev != memfd.memfd_device()
        shown = r"\(/dev/shm/memfd:lud-test-\d+ \(deleted\), tmpfs"
        with pytest.raises(UnsupportedFd, match=shown):
            memfd.inspect(fd)
    finally:
        os.close(fd)


def test_memfds_of_every_kind_are_memfds() -> None:
    """Sealable or not, sealed, executable or not, read-only reopened: all memfds."""
    flags = [0, os.MFD_ALLOW_SEALING, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING]
    flags += [getattr(os, f) for f in ("MFD_NOEXEC_SEAL", "MFD_EXEC") if hasattr(os, f)]
    for flag in flags:
        fd = os.memfd_create("m", flag)
        read_only = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            assert memfd.inspect(fd).kind == "memfd"
            assert memfd.inspect(read_only).name == "m"
        finally:
            os.close(fd)
            os.close(read_only)


def test_data_extents_skip_holes() -> None:
    fd = os.memfd_create("sparse")
    os.ftruncate(fd, 64 << 20)
    os.pwrite(fd, b"a" * 4096, 8 << 20)
    os.pwrite(fd, b"b" * 4096, 63 << 20)
    assert memfd.data_extents(fd, 64 << 20) == [(8 << 20, 4096), (63 << 20, 4096)]
    os.close(fd)


def test_handover_rebuilds_memfds_exactly(tmp_path: Path) -> None:
    ram = make_guest_memory(128 << 20)
    sealed = os.memfd_create("rom", os.MFD_ALLOW_SEALING)
    os.write(sealed, b"firmware" * 1000)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    unsealable = os.memfd_create("plain")
    os.ftruncate(unsealable, 1 << 20)
    fds = {("vm", "ram"): ram, ("vm", "rom"): sealed, ("vm", "plain"): unsealable}
    before = {key: fingerprint(fd) for key, fd in fds.items()}
    area = tmp_path / "handover"
    carried = SimulatedBackend(area).write_handover(
        fds, {k: entry(k[1], str(before[k].name)) for k in fds}, "boot-1", lambda n: None
    )
    assert carried == sum(before[k].data_bytes for k in fds)
    data_blocks = sum(os.stat(p).st_blocks * 512 for p in (area / "data").iterdir())
    assert data_blocks < 64 << 20  # sparse: far below the 129 MiB of apparent size
    for fd in fds.values():
        os.close(fd)

    backend = SimulatedBackend(area)  # as a fresh daemon of the next boot
    handover = backend.find_handover()
    assert handover is not None and handover.boot_id == "boot-1"
    assert handover.keys == frozenset(fds)
    for key in fds:
        fd = backend.retrieve_fd(key, entry(key[1]))
        assert fingerprint(fd) == before[key]
        os.close(fd)
    backend.finish()
    assert os.listdir(area) == []


def test_a_damaged_kexec_record_is_corrupted_not_used(tmp_path: Path) -> None:
    fd = os.memfd_create("ram")
    os.write(fd, b"data")
    area = tmp_path / "handover"
    SimulatedBackend(area).write_handover({("vm", "ram"): fd}, {("vm", "ram"): entry("ram")},
                                          "boot", lambda n: None)
    record = area / RECORD_NAME
    record.write_bytes(record.read_bytes().replace(b'"size":4', b'"size":5'))
    backend = SimulatedBackend(area)
    handover = backend.find_handover()
    assert handover is not None and handover.damage is not None
    assert "fails its checks" in handover.damage
    with pytest.raises(Corrupted, match="fails its checks"):
        backend.retrieve_fd(("vm", "ram"), entry("ram"))
    os.close(fd)


def test_handover_content_that_fails_its_checksum_is_not_handed_out(tmp_path: Path) -> None:
    fd = os.memfd_create("ram")
    os.write(fd, b"data" * 1024)
    area = tmp_path / "handover"
    SimulatedBackend(area).write_handover({("vm", "ram"): fd}, {("vm", "ram"): entry("ram")},
                                          "boot", lambda n: None)
    (data_file,) = (area / "data").iterdir()
    with data_file.open("r+b") as f:
        f.write(b"D")
    with pytest.raises(Corrupted, match="fails its checksum"):
        SimulatedBackend(area).retrieve_fd(("vm", "ram"), entry("ram"))
    os.close(fd)


def test_data_extents_leave_the_shared_file_position_alone() -> None:
    fd = os.memfd_create("pos")
    os.ftruncate(fd, 1 << 20)
    os.pwrite(fd, b"x", 900_000)
    os.lseek(fd, 1234, os.SEEK_SET)
    assert memfd.data_extents(fd, 1 << 20) == [(897024, 4096)]
    assert os.lseek(fd, 0, os.SEEK_CUR) == 1234
    os.close(fd)


def test_truncated_handover_data_is_corrupted(tmp_path: Path) -> None:
    fd = os.memfd_create("ram")
    os.write(fd, b"data" * 1024)
    area = tmp_path / "handover"
    backend = SimulatedBackend(area)
    backend.write_handover({("vm", "ram"): fd}, {("vm", "ram"): entry("ram")}, "b", lambda n: None)
    (data_file,) = (area / "data").iterdir()
    os.truncate(data_file, 100)
    with pytest.raises(Corrupted, match="has 100 bytes"):
        SimulatedBackend(area).retrieve_fd(("vm", "ram"), entry("ram"))
    os.close(fd)


def test_copy_checksums_the_extents_it_copies_and_keeps_the_position() -> None:
    src = make_guest_memory(128 << 20)
    os.lseek(src, 12345, os.SEEK_SET)
    extents = memfd.data_extents(src, os.fstat(src).st_size)
    dst = memfd.create("copy", os.fstat(src).st_size)
    copied, crc = memfd.copy_extents(src, dst, extents)
    expected = 0
    for start, length in extents:
        expected = zlib.crc32(os.pread(src, length, start), expected)
    assert (copied, crc) == (sum(length for _, length in extents), expected)
    assert memfd.data_extents(dst, os.fstat(dst).st_size) == extents
    assert os.lseek(src, 0, os.SEEK_CUR) == 12345 and os.lseek(dst, 0, os.SEEK_CUR) == 0
    for fd in (src, dst):
        os.close(fd)


def test_a_source_cut_short_during_the_copy_is_corrupted_not_a_crash() -> None:
    """A VMM may shrink an unsealed memfd under the daemon: no SIGBUS, a clear error."""
    src = os.memfd_create("ram")
    os.pwrite(src, b"x" * 4096, 0)
    dst = memfd.create("copy", 1 << 20)
    with pytest.raises(Corrupted, match="source ended at byte 4096"):
        memfd.copy_extents(src, dst, [(0, 1 << 20)])  # extents from before a truncate
    for fd in (src, dst):
        os.close(fd)


def test_the_handover_does_not_move_a_file_position_two_keys_share(tmp_path: Path) -> None:
    """One open memfd under two tokens: copied in parallel, its position left alone."""
    ram = make_guest_memory(128 << 20)
    os.lseek(ram, 777, os.SEEK_SET)
    fds = {("vm", "ram"): ram, ("vm", "alias"): ram}
    area = tmp_path / "handover"
    SimulatedBackend(area).write_handover(
        fds, {k: entry(k[1], "guest-ram") for k in fds}, "boot-1", lambda n: None
    )
    assert os.lseek(ram, 0, os.SEEK_CUR) == 777
    backend = SimulatedBackend(area)
    for key in fds:
        back = backend.retrieve_fd(key, entry(key[1]))
        assert fingerprint(back) == fingerprint(ram)
        assert os.lseek(back, 0, os.SEEK_CUR) == 777
        os.close(back)
    os.close(ram)


def test_a_large_memfd_is_carried_in_pieces_each_checksummed(tmp_path: Path) -> None:
    fd = os.memfd_create("ram")
    os.pwrite(fd, os.urandom(40 << 20), 0)  # one extent, three pieces
    area = tmp_path / "handover"
    SimulatedBackend(area).write_handover({("vm", "ram"): fd}, {("vm", "ram"): entry("ram")},
                                          "boot", lambda n: None)
    record = json.loads((area / RECORD_NAME).read_bytes().rpartition(b"\n")[0])
    (carried,) = record["fds"]
    assert carried["extents"] == [[0, 16 << 20], [16 << 20, 16 << 20], [32 << 20, 8 << 20]]
    assert carried["crc32s"] == [
        zlib.crc32(os.pread(fd, length, start)) for start, length in carried["extents"]
    ]
    back = SimulatedBackend(area).retrieve_fd(("vm", "ram"), entry("ram"))
    assert fingerprint(back).sha256 == fingerprint(fd).sha256
    for f in (fd, back):
        os.close(f)


def test_many_small_extents_are_copied_in_runs_each_checksummed(tmp_path: Path) -> None:
    """Extents are grouped into runs of up to PIECE bytes (one thread writes a file in
    order); the record still has one checksum per extent, in order."""
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 128 << 20)
    for i in range(40):  # just over 1 MiB of data every 3 MiB: 40 extents, 3 runs
        os.pwrite(fd, os.urandom((1 << 20) + i * 4096), i * (3 << 20) + (1 << 20))
    assert [len(run) for run in _runs([(0, 6 << 20)] * 5)] == [2, 2, 1]
    assert [len(run) for run in _runs([(0, 16 << 20), (0, 1), (0, 16 << 20)])] == [1, 1, 1]
    area = tmp_path / "handover"
    SimulatedBackend(area).write_handover({("vm", "ram"): fd}, {("vm", "ram"): entry("ram")},
                                          "boot", lambda n: None)
    record = json.loads((area / RECORD_NAME).read_bytes().rpartition(b"\n")[0])
    (carried,) = record["fds"]
    assert len(carried["extents"]) == 40
    assert carried["crc32s"] == [
        zlib.crc32(os.pread(fd, length, start)) for start, length in carried["extents"]
    ]
    back = SimulatedBackend(area).retrieve_fd(("vm", "ram"), entry("ram"))
    assert fingerprint(back) == fingerprint(fd)
    for f in (fd, back):
        os.close(f)


def test_a_kexec_record_of_the_previous_version_still_carries(tmp_path: Path) -> None:
    """A live update often brings a new liveupdated: it reads the old one's handover,
    whose record has one checksum per fd (`crc32`) rather than one per piece."""
    fd = os.memfd_create("ram")
    os.pwrite(fd, b"old format" * 1000, 1 << 20)
    area = tmp_path / "handover"
    SimulatedBackend(area).write_handover({("vm", "ram"): fd}, {("vm", "ram"): entry("ram")},
                                          "boot", lambda n: None)
    record = json.loads((area / RECORD_NAME).read_bytes().rpartition(b"\n")[0])
    (carried,) = record["fds"]
    whole = 0
    for start, length in carried.pop("extents"):
        whole = zlib.crc32(os.pread(fd, length, start), whole)
    carried.pop("crc32s")
    carried.pop("offset")
    carried["extents"] = [[1 << 20, 10000]]
    carried["crc32"] = whole
    body = json.dumps(record, separators=(",", ":")).encode()
    (area / RECORD_NAME).write_bytes(body + b"\n" + str(zlib.crc32(body)).encode())
    back = SimulatedBackend(area).retrieve_fd(("vm", "ram"), entry("ram"))
    assert os.pread(back, 10000, 1 << 20) == b"old format" * 1000
    os.close(back)
    os.close(fd)


SEALS = [0, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL]
sizes = st.sampled_from([0, 1, 4095, 4096, 9000, PACK_BYTES, PACK_BYTES + 1, 3 << 20])


@st.composite
def guest_fd(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]], int, int]:
    """(size, data written as (offset, length), seals, position) of one memfd."""
    size = draw(sizes)
    pieces = draw(st.lists(st.tuples(st.integers(0, max(size - 1, 0)),
                                     st.integers(1, 20000)), max_size=3)) if size else []
    return (size, [(o, min(n, size - o)) for o, n in pieces], draw(st.sampled_from(SEALS)),
            draw(st.integers(0, size)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions=st.lists(st.lists(guest_fd(), min_size=1, max_size=5), min_size=1, max_size=3))
def test_small_fds_share_their_sessions_pack_and_each_comes_back_exactly(
    tmp_path_factory: pytest.TempPathFactory,
    sessions: list[list[tuple[int, list[tuple[int, int]], int, int]]],
) -> None:
    """A file per large fd, one per session for its small ones, each at its own offset;
    holes stay holes; every fd rebuilt exactly (size, data, holes, seals, position, name);
    a byte damaged in one fd's part of a pack fails that fd only."""
    area = tmp_path_factory.mktemp("packs") / "handover"
    fds: dict[tuple[str, str], int] = {}
    for s, layouts in enumerate(sessions):
        for t, (size, pieces, seals, position) in enumerate(layouts):
            fd = os.memfd_create(f"s{s}t{t}", os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, size)
            for offset, length in pieces:
                os.pwrite(fd, bytes([s * 16 + t + 1]) * length, offset)
            os.lseek(fd, position, os.SEEK_SET)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            fds[(f"vm{s}", f"ram{t}")] = fd
    before = {key: fingerprint(fd) for key, fd in fds.items()}
    SimulatedBackend(area).write_handover(
        fds, {k: entry(k[1], str(before[k].name)) for k in fds}, "boot", lambda n: None)
    for fd in fds.values():
        os.close(fd)

    large = {k for k, f in before.items() if f.size > PACK_BYTES}
    packs = {f"vm{s}{PACK_SUFFIX}" for s in range(len(sessions))
             if any(k[0] == f"vm{s}" and k not in large for k in fds)}
    files = {p.name for p in (area / "data").iterdir()}
    assert files == packs | {f"{k[0]}.{k[1]}" for k in large}
    data = sum(f.data_bytes for f in before.values())
    blocks = sum(os.stat(area / "data" / name).st_blocks * 512 for name in files)
    assert blocks <= data + 4096 * (2 * len(fds) + 8)  # holes stay holes
    backend = SimulatedBackend(area)
    for key in fds:
        back = backend.retrieve_fd(key, entry(key[1]))
        assert fingerprint(back) == before[key], key
        os.close(back)

    damaged = next((k for k in fds if k not in large and before[k].data_bytes), None)
    if damaged is not None:
        path, offset = carried_data(area, *damaged)
        start = before[damaged].extents[0][0]
        with path.open("r+b") as f:
            f.seek(offset + start)
            byte = f.read(1)
            f.seek(offset + start)
            f.write(bytes([byte[0] ^ 0xFF]))
        backend = SimulatedBackend(area)
        for key in fds:
            if key == damaged:
                with pytest.raises(Corrupted, match="fails its checksum"):
                    backend.retrieve_fd(key, entry(key[1]))
            else:
                os.close(backend.retrieve_fd(key, entry(key[1])))


def test_a_finished_session_leaves_no_data_behind(tmp_path: Path) -> None:
    """Session.Finish: its pack goes, and the files of the large fds it released."""
    small, big = make_memfd_with(4096), make_memfd_with(PACK_BYTES + 4096)
    other = make_memfd_with(4096)
    fds = {("vm", "small"): small, ("vm", "big"): big, ("vm2", "small"): other}
    area = tmp_path / "handover"
    SimulatedBackend(area).write_handover(fds, {k: entry(k[1]) for k in fds}, "boot",
                                          lambda n: None)
    backend = SimulatedBackend(area)
    os.close(backend.retrieve_fd(("vm", "small"), entry("small")))
    backend.finish_session("vm", ["big"])
    assert sorted(p.name for p in (area / "data").iterdir()) == [f"vm2{PACK_SUFFIX}"]
    os.close(backend.retrieve_fd(("vm2", "small"), entry("small")))
    for fd in fds.values():
        os.close(fd)


def make_memfd_with(size: int) -> int:
    fd = os.memfd_create("ram")
    os.pwrite(fd, b"x" * size, 0)
    return fd


def test_the_carried_size_is_the_size_handed_over_not_the_size_preserved(
    tmp_path: Path,
) -> None:
    """A memfd preserved small and grown before the reboot: the next boot knows its real
    size before rebuilding it (a large one is never rebuilt on the event loop)."""
    fd = make_memfd_with(4096)
    preserved = FdEntry("ram", "memfd", (), 4096, "ram", 0)
    os.ftruncate(fd, 8 << 20)
    os.pwrite(fd, b"grown", (8 << 20) - 5)
    area = tmp_path / "handover"
    SimulatedBackend(area).write_handover({("vm", "ram"): fd}, {("vm", "ram"): preserved},
                                          "boot", lambda n: None)
    os.close(fd)
    backend = SimulatedBackend(area)
    assert backend.find_handover() is not None
    assert backend.carried_size(("vm", "ram")) == 8 << 20
    assert backend.carried_size(("vm", "rom")) is None
    back = backend.retrieve_fd(("vm", "ram"), preserved)
    assert os.fstat(back).st_size == 8 << 20 and os.pread(back, 5, (8 << 20) - 5) == b"grown"
    os.close(back)
